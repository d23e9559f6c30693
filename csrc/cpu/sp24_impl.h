// 2:4-sparse GEMM over the CPU sp24 layout (docs/formats.md, "CPU layouts"), written once over the SIMD
// traits and compiled per ISA level. Included by gemm_impl.h after its kernels (same namespace: F, NV,
// Scratch, scratch, t_panel, store_tile, with_rows, clamp_threads, kPrefetch are in scope); additionally
// needs from gemm_<isa>.cpp
//   S     sparse traits: X (x[4g .. 4g+3] replicated over F's lanes), M (F::W lanes of uint32 metadata),
//         xrep(p), loadm(p), shr(m, bits), gather(X, M idx): lane i = x[idx_i & 3] (only the low 2 bits
//         of idx count: x is replicated), bf16(p): W bf16 bit patterns -> float
//   kMrS  rows of the gather micro-kernel's register tile
// Per block of 32 output channels and per group g of 4 input columns, the layout holds the two kept
// values of every channel (slot 0, slot 1) as 2 x 32 lanes, and one uint32 metadata word per channel and
// 8 groups: the 2-bit position of slot s of group g sits at bits 4 (g % 8) + 2 s (the canonical meta
// bytes of the channel, read as little-endian 32-bit words). Per group, each slot is one gather of x at
// the 32 channels' positions and one FMA with the 32 kept values: half the FMAs of the dense product.

namespace qruntime::cpu::QR_NS {
namespace {

constexpr int64_t kSp24GroupsPerWord = 8;

// The stored element type of the kept values: what one F vector of lanes [v * W, v * W + W) of slot
// `slot` of group `g` loads.
template <int Kind>
struct Sp24Vals;

template <>
struct Sp24Vals<kSp24F32> {
  static constexpr int64_t kGroupBytes = 2 * kBlockN * 4;
  const float* p;
  typename F::R operator()(int64_t g, int slot, int v) const {
    return F::load(p + (2 * g + slot) * kBlockN + v * F::W);
  }
};

template <>
struct Sp24Vals<kSp24Bf16> {
  static constexpr int64_t kGroupBytes = 2 * kBlockN * 2;
  const uint16_t* p;
  typename F::R operator()(int64_t g, int slot, int v) const {
    return S::bf16(p + (2 * g + slot) * kBlockN + v * F::W);
  }
};

template <>
struct Sp24Vals<kSp24I8> {
  static constexpr int64_t kGroupBytes = 2 * kBlockN;
  const int8_t* p;
  typename F::R operator()(int64_t g, int slot, int v) const {
    return F::i8(p + (2 * g + slot) * kBlockN + v * F::W);
  }
};

// INT4 codes, 16 bytes a slot (lane j low nibble, lane j + 16 high nibble), dequantized on load with the
// scale and zero term of the current quantization group: code * s + zs.
template <>
struct Sp24Vals<kSp24U4> {
  static constexpr int64_t kGroupBytes = kBlockN;
  const uint8_t* p;
  typename F::R s[NV], zs[NV];
  typename F::R operator()(int64_t g, int slot, int v) const {
    const uint8_t* row16 = p + (2 * g + slot) * (kBlockN / 2);
    return F::fma(F::u4(row16 + (v * F::W) % 16, v * F::W >= 16), s[v], zs[v]);
  }
};

// tile[r][:] += sum over groups g in [g0, g1) of the 32 channels' kept values times x at their positions,
// for MR rows of x (row stride ldx, at least 4 * g1 readable columns). meta: the block's words [.][32].
template <int MR, class Vals>
__attribute__((noinline)) void sp24_kernel(const float* x, int64_t ldx, const uint32_t* meta, int64_t g0,
                                           int64_t g1, const Vals& vals, const uint8_t* pf_vals, float* tile) {
  // Few rows: separate accumulators for the two slots, for more independent FMA chains.
  constexpr int A = MR * NV >= 8 ? 1 : 2;
  typename F::R acc[A][MR][NV];
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      acc[0][m][v] = F::load(tile + m * kBlockN + v * F::W);
      if constexpr (A == 2) acc[A - 1][m][v] = F::zero();
    }
  for (int64_t w = g0 / kSp24GroupsPerWord; w * kSp24GroupsPerWord < g1; ++w) {
    const int64_t gs = w * kSp24GroupsPerWord > g0 ? w * kSp24GroupsPerWord : g0;
    const int64_t ge = imin(g1, (w + 1) * kSp24GroupsPerWord);
    const uint32_t* mw = meta + w * kBlockN;
    __builtin_prefetch(reinterpret_cast<const uint8_t*>(mw) + kPrefetch);
    __builtin_prefetch(reinterpret_cast<const uint8_t*>(mw) + kPrefetch + 64);
    typename S::M mv[NV];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      mv[v] = S::shr(S::loadm(mw + v * F::W), static_cast<int>(4 * (gs - w * kSp24GroupsPerWord)));
    }
    for (int64_t g = gs; g < ge; ++g) {
      // Software prefetch of the compact value streams (bf16, int8, INT4), measured faster from DRAM at
      // M = 1; float32 values (4 lines a group) are faster without it.
      if constexpr (Vals::kGroupBytes <= 128) {
        const uint8_t* pf = pf_vals + g * Vals::kGroupBytes + kPrefetch;
#pragma GCC unroll 2
        for (int64_t b = 0; b < Vals::kGroupBytes; b += 64) __builtin_prefetch(pf + b);
      }
      typename S::X xr[MR];
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) xr[m] = S::xrep(x + m * ldx + 4 * g);
#pragma GCC unroll 2
      for (int slot = 0; slot < 2; ++slot)
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) {
          const typename S::M idx = slot ? S::shr(mv[v], 2) : mv[v];
          const typename F::R wv = vals(g, slot, v);
#pragma GCC unroll 16
          for (int m = 0; m < MR; ++m) {
            acc[slot % A][m][v] = F::fma(wv, S::gather(xr[m], idx), acc[slot % A][m][v]);
          }
        }
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) mv[v] = S::shr(mv[v], 4);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      F::store(tile + m * kBlockN + v * F::W, A == 2 ? F::add(acc[0][m][v], acc[A - 1][m][v]) : acc[0][m][v]);
    }
}

struct Sp24Args {
  const float* x;      // [m, ldx]; the kernel reads 4 * groups columns (zero padded past k)
  int64_t ldx;
  int64_t m, k, kp;    // kp = 4 * groups
  const void* values;  // [nb, kp / 4, 2, 32] (f32 / bf16 bits / int8) or [nb, kp / 4, 2, 16] (INT4)
  const uint32_t* meta;  // [nb, words, 32]
  int64_t words;
  const float* s;      // INT8: [nb * 32] row scales; INT4: [kp / group, nb * 32]; else null
  const float* zs;     // INT4: [kp / group, nb * 32] = -zero * s
  int64_t group;       // INT4: dense columns per quantization group (a multiple of 4)
  const float* bias;
  int64_t n;
  float* y;
};

template <int Kind>
void sp24_task(void* ctx, int64_t b0, int64_t b1) {
  const auto& a = *static_cast<const Sp24Args*>(ctx);
  const int64_t groups = a.kp / 4;
  const int64_t ldg = (a.n + kBlockN - 1) / kBlockN * kBlockN;  // row stride of s / zs (INT4)
  // quantization groups (INT4): runs of `per` groups of 4 sharing scales; one run otherwise
  const int64_t per = Kind == kSp24U4 ? a.group / 4 : groups;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int64_t valid = imin(kBlockN, a.n - blk * kBlockN);
    float* yb = a.y + blk * kBlockN;
    const uint32_t* mb = a.meta + blk * a.words * kBlockN;
    const uint8_t* vb = static_cast<const uint8_t*>(a.values) + blk * groups * Sp24Vals<Kind>::kGroupBytes;
    Sp24Vals<Kind> vals;
    vals.p = reinterpret_cast<decltype(vals.p)>(vb);
    // per quantization group: sets up vals (INT4 scales) and calls body(g0, g1)
    const auto for_runs = [&](auto&& body) {
      for (int64_t g0 = 0; g0 < groups; g0 += per) {
        if constexpr (Kind == kSp24U4) {
          const int64_t q = g0 / per;
          for (int v = 0; v < NV; ++v) {
            vals.s[v] = F::load(a.s + q * ldg + blk * kBlockN + v * F::W);
            vals.zs[v] = F::load(a.zs + q * ldg + blk * kBlockN + v * F::W);
          }
        }
        body(g0, imin(groups, g0 + per));
      }
    };
    const float* scale = Kind == kSp24I8 ? a.s + blk * kBlockN : nullptr;
    const float* bias = a.bias ? a.bias + blk * kBlockN : nullptr;
    alignas(64) float tile[kMrS * kBlockN];
    if (a.m <= kMrS) {  // one row tile: straight from the layout
      std::memset(tile, 0, sizeof(float) * kBlockN * a.m);
      with_rows<kMrS>(static_cast<int>(a.m), [&](auto r) {
        for_runs([&](int64_t g0, int64_t g1) {
          sp24_kernel<decltype(r)::value>(a.x, a.ldx, mb, g0, g1, vals, vb, tile);
        });
      });
      store_tile(yb, a.n, static_cast<int>(a.m), valid, scale, bias, tile);
      continue;
    }
    // Several row tiles: the block's kept values are first widened once to float32 (INT4: dequantized) in
    // the f32 layout [groups, 2, 32], which every row tile then reads from L2. (Faster than expanding to a
    // dense panel for the dense micro-kernel, measured at M = 32 and 128: half the FMAs.)
    Sp24Vals<kSp24F32> fv{static_cast<const float*>(static_cast<const void*>(vb))};
    if constexpr (Kind != kSp24F32) {
      float* buf = static_cast<float*>(scratch(t_panel, sizeof(float) * 2 * kBlockN * groups));
      for_runs([&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g)
          for (int slot = 0; slot < 2; ++slot)
            for (int v = 0; v < NV; ++v) F::store(buf + (2 * g + slot) * kBlockN + v * F::W, vals(g, slot, v));
      });
      fv.p = buf;
    }
    for (int64_t m0 = 0; m0 < a.m; m0 += kMrS) {
      const int rows = static_cast<int>(imin(kMrS, a.m - m0));
      std::memset(tile, 0, sizeof(float) * kBlockN * rows);
      with_rows<kMrS>(rows, [&](auto r) {
        sp24_kernel<decltype(r)::value>(a.x + m0 * a.ldx, a.ldx, mb, 0, groups, fv,
                                        reinterpret_cast<const uint8_t*>(fv.p), tile);
      });
      store_tile(yb + m0 * a.n, a.n, rows, valid, scale, bias, tile);
    }
  }
}

thread_local Scratch t_sp24_x;

void sp24(const float* x, int64_t m, int64_t k, int64_t kp, int kind, const void* values, const uint32_t* meta,
          const float* s, const float* zs, int64_t group, const float* bias, int64_t n, float* y, int threads) {
  Sp24Args args{x, k, m, k, kp, values, meta, (kp + 31) / 32, s, zs, group, bias, n, y};
  if (k < kp) {  // the kernel reads whole groups of 4: x zero padded to kp
    float* xp = static_cast<float*>(scratch(t_sp24_x, sizeof(float) * m * kp));
    for (int64_t r = 0; r < m; ++r) {
      std::memcpy(xp + r * kp, x + r * k, sizeof(float) * k);
      std::memset(xp + r * kp + k, 0, sizeof(float) * (kp - k));
    }
    args.x = xp;
    args.ldx = kp;
  }
  TaskFn task = kind == kSp24F32 ? sp24_task<kSp24F32>
                : kind == kSp24Bf16 ? sp24_task<kSp24Bf16>
                : kind == kSp24I8  ? sp24_task<kSp24I8>
                                   : sp24_task<kSp24U4>;
  // the work is about half the dense GEMM's
  parallel_for((n + kBlockN - 1) / kBlockN, clamp_threads(threads, m, n, k / 2), task, &args);
}

}  // namespace
}  // namespace qruntime::cpu::QR_NS
