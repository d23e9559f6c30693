// The native decoding step (decode_plan.h).
#include "decode_plan.h"

namespace qruntime::cpu {

void Gemm::run(const float* x, int64_t m, float* y, int threads) const {
  const auto& t = current_table();
  switch (kind) {
    case kW8A16: t.w8a16(x, m, k, static_cast<const int8_t*>(w), s, bias, n, y, threads); break;
    case kW4A16:
      t.w4a16(x, m, k, static_cast<const uint8_t*>(w), kp, s, zs, group, bias, n, y, threads);
      break;
    case kW8A8: t.w8a8(x, m, k, static_cast<const int8_t*>(w), wsum, s, bias, n, y, threads); break;
    default: t.sp24(x, m, k, kp, sp24_kind, w, meta, s, zs, group, bias, n, y, threads); break;
  }
}

namespace {
void run_all(const std::vector<Gemm>& gemms, const float* x, float* out, int threads) {
  for (const auto& g : gemms) g.run(x, 1, out + g.out_offset, threads);
}
}  // namespace

void DecodePlan::run(int64_t pos, int threads) const {
  const auto& t = current_table();
  const auto norm = [&](const float* r, const float* w, const float* b, float eps) {
    if (layer_norm) {
      t.add_layer_norm(h, r, hidden, w, b, eps, x);
    } else {
      t.add_rms_norm(h, r, hidden, w, eps, x);
    }
  };
  const float* residual = nullptr;
  const int64_t half = head_dim / 2;
  for (const auto& b : blocks) {
    norm(residual, b.norm1_w, b.norm1_b, b.eps1);
    run_all(b.qkv, x, qkv, threads);
    AttendArgs args{qkv, b.k_cache, b.v_cache, cos ? cos + pos * half : nullptr, sin ? sin + pos * half : nullptr,
                    att, heads, kv_heads, head_dim, capacity, pos, scale, b.q_norm, b.k_norm, b.qk_eps};
    t.attend(&args, threads);
    run_all(b.o, att, r, threads);
    norm(r, b.norm2_w, b.norm2_b, b.eps2);
    run_all(b.up, x, g, threads);
    t.act_mul(g, intermediate, act, a);
    run_all(b.down, a, r, threads);
    residual = r;
  }
  norm(residual, final_w, final_b, final_eps);
  run_all(head, x, logits, threads);
}

}  // namespace qruntime::cpu
