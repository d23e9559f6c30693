// CPU GEMM kernels over the CPU-packed weight layouts of docs/formats.md ("CPU layouts").
// One implementation (gemm_impl.h) is compiled once per ISA level with that level's flags
// (gemm_avx512.cpp, gemm_avx2.cpp, gemm_scalar.cpp); dispatch.cpp picks the table at run time from the
// CPU that runs, never the one that built. No torch headers.
#pragma once
#include <cstdint>

namespace qruntime::cpu {

// Columns of one packed weight block: every CPU layout stores output channels in blocks of 32.
constexpr int kBlockN = 32;

struct AttendArgs;

struct KernelTable {
  const char* name;
  // y[m, n] = scales[n] * sum_k x[m, k] * q[n, k] + bias[n]
  //   x: f32 [m, k]; wp: int8 [nb, k, 32]; scales, bias: f32 [nb * 32] (bias may be null); y: f32 [m, n]
  void (*w8a16)(const float* x, int64_t m, int64_t k, const int8_t* wp, const float* scales,
                const float* bias, int64_t n, float* y, int threads);
  // y[m, n] = sum_k x[m, k] * (u[n, k] * s[g, n] + zs[g, n]) + bias[n],  g = k / group
  //   wp: u8 [nb, kp, 16] (byte j: low nibble column j, high nibble column j + 16 of the block);
  //   s, zs: f32 [kp / group, nb * 32] with zs = -zero * s; k <= kp columns of x are used.
  void (*w4a16)(const float* x, int64_t m, int64_t k, const uint8_t* wp, int64_t kp, const float* s,
                const float* zs, int64_t group, const float* bias, int64_t n, float* y, int threads);
  // Dynamic per-token INT8 activations: a[m] = max_k |x[m, k]| / 127, xq = round_half_even(x * 127 / max)
  // y[m, n] = a[m] * scales[n] * sum_k xq[m, k] * q[n, k] + bias[n]  (int32 accumulation)
  //   wp: int8 [nb, k4 / 4, 32, 4] (k4 = k rounded up to 4); wsum: int32 [nb * 32], sum_k q[n, k]
  void (*w8a8)(const float* x, int64_t m, int64_t k, const int8_t* wp, const int32_t* wsum,
               const float* scales, const float* bias, int64_t n, float* y, int threads);
  // The per-token quantization w8a8 applies, exposed for tests: xq int8 [m, k], a f32 [m].
  void (*quantize_rows)(const float* x, int64_t m, int64_t k, int8_t* xq, float* a);
  // 2:4 sparse: y[m, n] = sum_k x[m, k] * W[n, k] + bias[n], W expanded from the sp24 layout:
  //   values: [nb, kp / 4, 2, 32] of `kind` (f32, bf16 bit patterns, int8 codes) or, for kSp24U4,
  //     u8 [nb, kp / 4, 2, 16] INT4 codes (byte j: low nibble lane j, high nibble lane j + 16);
  //   meta: u32 [nb, ceil(kp / 32), 32], slot s of group g of channel j at bits 4 (g % 8) + 2 s of
  //     word [g / 8][j] (a 2-bit position 0..3 inside the group);
  //   s: kSp24I8: f32 [nb * 32] (W = code * s); kSp24U4: f32 [kp / group, nb * 32] with zs = -zero * s
  //     (W = code * s + zs, group a multiple of 4 dividing kp); null otherwise. k <= kp, kp % 4 == 0.
  void (*sp24)(const float* x, int64_t m, int64_t k, int64_t kp, int kind, const void* values,
               const uint32_t* meta, const float* s, const float* zs, int64_t group, const float* bias,
               int64_t n, float* y, int threads);
  // From this many rows on, w8a16 and w4a16 multiply in bf16 (x and the dequantized weight rounded to
  // bf16 as under autocast; an int8 code is exact in bf16 and its scale applied to the fp32 sum), with
  // fp32 accumulation; 0: never (fp32 products at every m).
  int bf16_rows;

  // One decoding step (a single new token), the work between the GEMMs (decode_impl.h):
  // h[i] += r[i] (r may be null), then x = h / sqrt(mean(h^2) + eps) * w            (RMSNorm)
  void (*add_rms_norm)(float* h, const float* r, int64_t n, const float* w, float eps, float* x);
  // h[i] += r[i] (r may be null), then x = (h - mean) / sqrt(var + eps) * w + b     (LayerNorm; b may be null)
  void (*add_layer_norm)(float* h, const float* r, int64_t n, const float* w, const float* b, float eps,
                         float* x);
  // act 0: y[i] = silu(g[i]) * g[n + i] (g has 2n values); 1: y = gelu_tanh(g); 2: y = gelu (erf);
  // 3: y[i] = gelu_tanh(g[i]) * g[n + i]
  void (*act_mul)(const float* g, int64_t n, int act, float* y);
  // Attention of the token at position pos (see AttendArgs); q and the new k are rotated in place.
  void (*attend)(AttendArgs* args, int threads);
};

// One token's attention over a KV cache of `capacity` positions:
//   q: f32 [heads * hd + 2 * kv_heads * hd], the q | k | v projections of the token; when q_norm / k_norm
//     are given, each head of q / k is first RMS-normalized over hd (eps norm_eps) and scaled by them
//     (Qwen3's per-head norms), in place; then q and k are rotated in place when cos is given: x[i], x[i + hd/2] -> x[i] cos[i] - x[i + hd/2] sin[i],
//     x[i + hd/2] cos[i] + x[i] sin[i], for i < hd / 2);
//   k_cache f32 [kv_heads, hd, capacity] (keys transposed), v_cache f32 [kv_heads, capacity, hd]: the
//     token's k and v are written at pos, then query head h attends positions 0..pos of kv head
//     h / (heads / kv_heads) with softmax(scale * q.k) (fp32);
//   out f32 [heads * hd].
struct AttendArgs {
  float* q;
  float* k_cache;
  float* v_cache;
  const float* cos;
  const float* sin;
  float* out;
  int64_t heads, kv_heads, head_dim, capacity, pos;
  float scale;
  const float* q_norm;  // [hd] or null
  const float* k_norm;  // [hd] or null
  float norm_eps;
};

// Element type of the kept values in the sp24 layout.
enum Sp24Kind : int { kSp24F32 = 0, kSp24Bf16 = 1, kSp24I8 = 2, kSp24U4 = 3 };

const KernelTable& table_scalar();
const KernelTable& table_avx2();
const KernelTable& table_avx512();
const KernelTable& table_avx512bf16();
const KernelTable& table_amx();       // only when built with QR_HAVE_AMX
const KernelTable& table_amx_bf16();  // only when built with QR_HAVE_AMX_BF16

// In order: each level runs on a CPU with every level before it. kAmxBf16 is opt-in: best_isa() never
// picks it (not yet validated on AMX hardware); QRUNTIME_CPU_ISA=amx_bf16 selects it.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2, kAvx512Bf16 = 3, kAmxInt8 = 4, kAmxBf16 = 5 };
constexpr int kNumIsa = 6;

const char* isa_name(Isa isa);
bool isa_from_name(const char* name, Isa* out);
bool isa_compiled(Isa isa);    // built into this extension (setup.py drops AMX where the compiler lacks it)
bool isa_supported(Isa isa);   // can this CPU (and OS) run it?
Isa best_isa();
Isa current_isa();
void set_isa(Isa isa);          // caller checks isa_supported first
const KernelTable& current_table();

// Runs fn(ctx, begin, end) over [0, n) split in `threads` contiguous slices on a persistent pool
// (the calling thread takes the first slice). Calls are serialized; safe after fork.
using TaskFn = void (*)(void* ctx, int64_t begin, int64_t end);
void parallel_for(int64_t n, int threads, TaskFn fn, void* ctx);
bool openmp_available();        // built with OpenMP (then torch's OpenMP team runs the kernels)
bool use_thread_pool(bool on);  // run on the std::thread pool instead; false if OpenMP is unavailable
bool using_thread_pool();

}  // namespace qruntime::cpu
