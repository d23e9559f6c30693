// The CPU GEMMs, written once over small SIMD traits and compiled per ISA level. Included by
// gemm_<isa>.cpp after it defines, in namespace qruntime::cpu::QR_NS (anonymous inner namespace):
//   F            float vectors: R, W (lanes), zero/load/store/set1/fma/mul/add, i8(p): W int8 -> float,
//                u4(p, hi): low (hi=false) or high nibbles of W bytes -> float
//   I            int8 dot products: R (W int32 lanes), kUnsignedA, A prep(int32 four_bytes), B loadb(p),
//                dot(acc, A, B b): acc[j] += sum_{i<4} a_i * b[4j + i], sub/to_float/load
//   kMrF, kMrI   rows per register tile for the float and int8 micro-kernels
//   quantize_row(x, k, k4, q, a): per-token INT8 (see kernels.h), q padded to k4 with the zero code
// Everything here has internal linkage, and no std:: templates are instantiated: objects built with
// different -m flags must not share inline functions the linker could merge across ISA levels.
#include <cstdlib>
#include <cstring>

namespace qruntime::cpu::QR_NS {
namespace {

constexpr int NV = kBlockN / F::W;  // vectors per 32-column block
constexpr int64_t kPrefetch = 2048;
constexpr int64_t kScalePrefetch = 4;  // groups ahead (W4A16, few rows)

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <int N>
struct Int {
  static constexpr int value = N;
};

// Calls fn(Int<r>{}) for a run-time 1 <= r <= R.
template <int R, class Fn>
inline void with_rows(int r, Fn&& fn) {
  if constexpr (R >= 1) {
    if (r == R) {
      fn(Int<R>{});
    } else {
      with_rows<R - 1>(r, fn);
    }
  }
}

// Per-thread scratch that only grows (no allocation per call once warm).
struct Scratch {
  void* ptr = nullptr;
  size_t size = 0;
};
thread_local Scratch t_panel;
thread_local Scratch t_act;

void* scratch(Scratch& s, size_t bytes) {
  if (s.size < bytes) {
    std::free(s.ptr);
    const size_t rounded = (bytes + 63) / 64 * 64;
    s.ptr = std::aligned_alloc(64, rounded);
    if (s.ptr == nullptr) std::abort();
    s.size = rounded;
  }
  return s.ptr;
}

__attribute__((always_inline)) inline void store_block(float* y, const typename F::R* r, int64_t valid) {
  if (valid == kBlockN) {
    for (int v = 0; v < NV; ++v) F::store(y + v * F::W, r[v]);
    return;
  }
  alignas(64) float tmp[kBlockN];
  for (int v = 0; v < NV; ++v) F::store(tmp + v * F::W, r[v]);
  std::memcpy(y, tmp, sizeof(float) * valid);
}

// The micro-kernels are separate (noinline) functions whose accumulators are plain locals: GCC keeps
// those in registers, while accumulators shared with surrounding code end up spilled every iteration.
// Results go through a small tile in memory [MR][32] (float or int32), read by the epilogue.

// tile[m][:] += sum_{kk in [k0, k1)} x[m, kk] * load(kk, :)
template <int MR, class Load>
__attribute__((noinline)) void fma_kernel(const float* x, int64_t ldx, int64_t k0, int64_t k1, const Load& load,
                                          float* tile, const uint8_t* pf = nullptr, int64_t pf_row = 0) {
  // pf: the packed rows streamed from memory (row kk at pf + kk * pf_row); prefetched kPrefetch bytes
  // ahead, which the hardware prefetcher alone does not sustain for a cold weight stream.
  // Few rows: independent accumulator sets over consecutive k hide the FMA latency.
  constexpr int U = MR * NV >= 8 ? 1 : (8 + MR * NV - 1) / (MR * NV);
  typename F::R acc[U][MR][NV];
#pragma GCC unroll 8
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) acc[u][m][v] = u == 0 ? F::load(tile + m * kBlockN + v * F::W) : F::zero();
  int64_t kk = k0;
  for (; kk + U <= k1; kk += U) {
    if (pf) __builtin_prefetch(pf + kk * pf_row + kPrefetch);
#pragma GCC unroll 8
    for (int u = 0; u < U; ++u) {
      typename F::R w[NV];
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) w[v] = load(kk + u, v);
#pragma GCC unroll 16
      for (int m = 0; m < MR; ++m) {
        const typename F::R xb = F::set1(x[m * ldx + kk + u]);
#pragma GCC unroll 32
        for (int v = 0; v < NV; ++v) acc[u][m][v] = F::fma(w[v], xb, acc[u][m][v]);
      }
    }
  }
  for (; kk < k1; ++kk) {
    typename F::R w[NV];
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) w[v] = load(kk, v);
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
      const typename F::R xb = F::set1(x[m * ldx + kk]);
#pragma GCC unroll 32
      for (int v = 0; v < NV; ++v) acc[0][m][v] = F::fma(w[v], xb, acc[0][m][v]);
    }
  }
#pragma GCC unroll 16
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 32
    for (int v = 0; v < NV; ++v) {
      typename F::R r = acc[0][m][v];
#pragma GCC unroll 8
      for (int u = 1; u < U; ++u) r = F::add(r, acc[u][m][v]);
      F::store(tile + m * kBlockN + v * F::W, r);
    }
}

// y rows [0, rows) = tile * scale + bias (scale/bias may be null: 1 / 0)
inline void store_tile(float* y, int64_t ldy, int rows, int64_t valid, const float* scale, const float* bias,
                       const float* tile) {
  for (int m = 0; m < rows; ++m) {
    typename F::R r[NV];
    for (int v = 0; v < NV; ++v) {
      r[v] = F::load(tile + m * kBlockN + v * F::W);
      if (scale) r[v] = F::mul(r[v], F::load(scale + v * F::W));
      if (bias) r[v] = F::add(r[v], F::load(bias + v * F::W));
    }
    store_block(y + m * ldy, r, valid);
  }
}

// The float GEMM of one 32-column block: directly over the packed codes when all rows fit one register
// tile (every weight is converted once either way), else over a dequantized panel P [k, 32].
// direct(rows_tag, tile) accumulates into the tile; pack(panel) fills P.
template <class Direct, class Pack>
void a16_block(const float* x, int64_t m, int64_t k, int64_t n, int64_t blk, const float* scale,
               const float* bias, float* y, const Direct& direct, const Pack& pack) {
  const int64_t valid = imin(kBlockN, n - blk * kBlockN);
  float* yb = y + blk * kBlockN;
  alignas(64) float tile[kMrF * kBlockN];
  if (m <= kMrF) {
    std::memset(tile, 0, sizeof(float) * kBlockN * m);
    with_rows<kMrF>(static_cast<int>(m), [&](auto rows) { direct(rows, tile); });
    store_tile(yb, n, static_cast<int>(m), valid, scale, bias, tile);
    return;
  }
  float* panel = static_cast<float*>(scratch(t_panel, sizeof(float) * kBlockN * k));
  pack(panel);
  const auto load = [panel](int64_t kk, int v) { return F::load(panel + kk * kBlockN + v * F::W); };
  for (int64_t m0 = 0; m0 < m; m0 += kMrF) {
    const int rows = static_cast<int>(imin(kMrF, m - m0));
    std::memset(tile, 0, sizeof(float) * kBlockN * rows);
    with_rows<kMrF>(rows, [&](auto r) {
      fma_kernel<decltype(r)::value>(x + m0 * k, k, 0, k, load, tile);
    });
    store_tile(yb + m0 * n, n, rows, valid, scale, bias, tile);
  }
}

// ---- W8A16 ---------------------------------------------------------------------------------------

struct W8A16Args {
  const float* x;
  int64_t m, k;
  const int8_t* wp;
  const float* scales;
  const float* bias;
  int64_t n;
  float* y;
};

void w8a16_task(void* ctx, int64_t b0, int64_t b1) {
  const auto& a = *static_cast<const W8A16Args*>(ctx);
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int8_t* bp = a.wp + blk * a.k * kBlockN;
    const auto load = [bp](int64_t kk, int v) { return F::i8(bp + kk * kBlockN + v * F::W); };
    a16_block(
        a.x, a.m, a.k, a.n, blk, a.scales + blk * kBlockN, a.bias ? a.bias + blk * kBlockN : nullptr, a.y,
        [&](auto rows, float* tile) {
          fma_kernel<decltype(rows)::value>(a.x, a.k, 0, a.k, load, tile, reinterpret_cast<const uint8_t*>(bp),
                                            kBlockN);
        },
        [&](float* panel) {
          for (int64_t kk = 0; kk < a.k; ++kk)
            for (int v = 0; v < NV; ++v) F::store(panel + kk * kBlockN + v * F::W, load(kk, v));
        });
  }
}

// ---- W4A16 ---------------------------------------------------------------------------------------

struct W4A16Args {
  const float* x;
  int64_t m, k;
  const uint8_t* wp;
  int64_t kp;
  const float* s;
  const float* zs;
  int64_t group;
  const float* bias;
  int64_t n;
  float* y;
  const float* xsum;  // [m, groups]: sum of x over each group (rows m <= kMrF only)
};

inline typename F::R u4_col(const uint8_t* row16, int v) {
  return F::u4(row16 + (v * F::W) % 16, v * F::W >= 16);
}

void w4a16_task(void* ctx, int64_t b0, int64_t b1) {
  const auto& a = *static_cast<const W4A16Args*>(ctx);
  const int64_t ldg = (a.n + kBlockN - 1) / kBlockN * kBlockN;  // row stride of s / zs
  const int64_t groups = (a.k + a.group - 1) / a.group;
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* bp = a.wp + blk * a.kp * (kBlockN / 2);
    // One group at a time: its scales and zero terms live in registers.
    const auto for_groups = [&](auto&& body) {
      for (int64_t g = 0; g < groups; ++g) {
        typename F::R s[NV], z[NV];
        for (int v = 0; v < NV; ++v) {
          s[v] = F::load(a.s + g * ldg + blk * kBlockN + v * F::W);
          z[v] = F::load(a.zs + g * ldg + blk * kBlockN + v * F::W);
        }
        const auto load = [&](int64_t kk, int v) {
          return F::fma(u4_col(bp + kk * (kBlockN / 2), v), s[v], z[v]);
        };
        body(g * a.group, imin(a.k, (g + 1) * a.group), load);
      }
    };
    a16_block(
        a.x, a.m, a.k, a.n, blk, nullptr, a.bias ? a.bias + blk * kBlockN : nullptr, a.y,
        [&](auto rows, float* tile) {
          if (a.xsum == nullptr) {  // more than 512 groups: dequantize in the loop
            for_groups([&](int64_t k0, int64_t k1, const auto& load) {
              fma_kernel<decltype(rows)::value>(a.x, a.k, k0, k1, load, tile);
            });
            return;
          }
          // Few rows: sum x * code over the group, then scale once: tile += s * acc + zs * sum(x).
          constexpr int MR = decltype(rows)::value;
          alignas(64) float gtile[MR * kBlockN];
          const auto codes = [bp](int64_t kk, int v) { return u4_col(bp + kk * (kBlockN / 2), v); };
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t k0 = g * a.group, k1 = imin(a.k, (g + 1) * a.group);
            if (g + kScalePrefetch < groups) {  // the scale rows are strided (one per group): prefetch them
              const int64_t ahead = (g + kScalePrefetch) * ldg + blk * kBlockN;
              __builtin_prefetch(a.s + ahead);
              __builtin_prefetch(a.s + ahead + 16);
              __builtin_prefetch(a.zs + ahead);
              __builtin_prefetch(a.zs + ahead + 16);
            }
            std::memset(gtile, 0, sizeof(gtile));
            fma_kernel<MR>(a.x, a.k, k0, k1, codes, gtile, bp, kBlockN / 2);
            const float* sg = a.s + g * ldg + blk * kBlockN;
            const float* zg = a.zs + g * ldg + blk * kBlockN;
            for (int r = 0; r < MR; ++r) {
              const typename F::R xsv = F::set1(a.xsum[r * groups + g]);
              for (int v = 0; v < NV; ++v) {
                float* t = tile + r * kBlockN + v * F::W;
                const typename F::R acc = F::fma(xsv, F::load(zg + v * F::W), F::load(t));
                F::store(t, F::fma(F::load(gtile + r * kBlockN + v * F::W), F::load(sg + v * F::W), acc));
              }
            }
          }
        },
        [&](float* panel) {
          for_groups([&](int64_t k0, int64_t k1, const auto& load) {
            for (int64_t kk = k0; kk < k1; ++kk)
              for (int v = 0; v < NV; ++v) F::store(panel + kk * kBlockN + v * F::W, load(kk, v));
          });
        });
  }
}

// ---- W8A8 ----------------------------------------------------------------------------------------

constexpr int NVI = kBlockN / I::W;

struct W8A8Args {
  const uint8_t* xq;  // [m, k4], signed or offset-128 codes (I::kUnsignedA)
  const float* xa;    // [m]
  int64_t m, k4;
  const int8_t* wp;
  const int32_t* wsum;
  const float* scales;
  const float* bias;
  int64_t n;
  float* y;
};

inline int32_t load_word(const uint8_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// tile[r][:] (+)= sum_s dot(x codes of row r at step s, weights of step s)   (int32)
template <int MR, bool kAccumulate = false>
__attribute__((noinline)) void i8_kernel(const uint8_t* xr, int64_t lda, const int8_t* bp, int64_t steps,
                                         int32_t* tile) {
  typename I::R acc[MR][NVI];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NVI; ++v) acc[r][v] = kAccumulate ? I::load(tile + r * kBlockN + v * I::W) : I::zero();
  for (int64_t s = 0; s < steps; ++s) {
    const int8_t* b = bp + s * (4 * kBlockN);
    __builtin_prefetch(b + kPrefetch);  // one step = 128 bytes = two cache lines
    __builtin_prefetch(b + kPrefetch + 64);
    typename I::B bv[NVI];
#pragma GCC unroll 32
    for (int v = 0; v < NVI; ++v) bv[v] = I::loadb(b + v * I::W * 4);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const auto ap = I::prep(load_word(xr + r * lda + 4 * s));
#pragma GCC unroll 32
      for (int v = 0; v < NVI; ++v) acc[r][v] = I::dot(acc[r][v], ap, bv[v]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 32
    for (int v = 0; v < NVI; ++v) I::store(tile + r * kBlockN + v * I::W, acc[r][v]);
}

#ifdef QR_AMX
// AMX: tile registers 0-1 = C (16 rows x 16 int32 columns each), 2 = A (16 rows x 64 activation bytes),
// 3-4 = B (16 k-steps x 16 columns x 4 bytes: exactly 64 bytes of our VNNI layout's 128-byte steps).
struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

void amx_configure() {
  alignas(64) TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 5; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// tile [16][32] int32 = sum over `chunks` x 16 steps (64 k each) for 16 rows of xr (row stride lda)
void amx_16x32(const uint8_t* xr, int64_t lda, const int8_t* bp, int64_t chunks, int32_t* tile) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t c = 0; c < chunks; ++c) {
    const int8_t* b = bp + c * 16 * (4 * kBlockN);
    _tile_loadd(2, xr + 64 * c, lda);
    _tile_loadd(3, b, 4 * kBlockN);
    _tile_loadd(4, b + 64, 4 * kBlockN);
    _tile_dpbusd(0, 2, 3);
    _tile_dpbusd(1, 2, 4);
  }
  _tile_stored(0, tile, 4 * kBlockN);
  _tile_stored(1, tile + 16, 4 * kBlockN);
}
#endif

void w8a8_task(void* ctx, int64_t b0, int64_t b1) {
  const auto& a = *static_cast<const W8A8Args*>(ctx);
  const int64_t steps = a.k4 / 4;
  alignas(64) int32_t tile[(kMrI > 16 ? kMrI : 16) * kBlockN];
#ifdef QR_AMX
  amx_configure();  // tile state is per thread
#endif
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int8_t* bp = a.wp + blk * steps * (4 * kBlockN);
    const int64_t valid = imin(kBlockN, a.n - blk * kBlockN);
    const int32_t* ws = a.wsum + blk * kBlockN;
    const float* sc = a.scales + blk * kBlockN;
    const float* bi = a.bias ? a.bias + blk * kBlockN : nullptr;
    for (int64_t m0 = 0; m0 < a.m;) {
      int rows = static_cast<int>(imin(kMrI, a.m - m0));
#ifdef QR_AMX
      if (a.m - m0 >= 16 && steps >= 16) {  // full AMX tiles; the K remainder (< 64) by VNNI
        rows = 16;
        const int64_t full = steps / 16 * 16;
        const uint8_t* xr = a.xq + m0 * a.k4;
        amx_16x32(xr, a.k4, bp, full / 16, tile);
        if (full < steps) {
          const int8_t* rest = bp + full * (4 * kBlockN);
          i8_kernel<12, true>(xr + 4 * full, a.k4, rest, steps - full, tile);
          i8_kernel<4, true>(xr + 12 * a.k4 + 4 * full, a.k4, rest, steps - full, tile + 12 * kBlockN);
        }
      } else
#endif
      {
        with_rows<kMrI>(rows, [&](auto r) { i8_kernel<decltype(r)::value>(a.xq + m0 * a.k4, a.k4, bp, steps, tile); });
      }
      for (int r = 0; r < rows; ++r) {
        typename F::R out[NV];
        const typename F::R xa = F::set1(a.xa[m0 + r]);
        for (int v = 0; v < NVI; ++v) {
          typename I::R t = I::load(tile + r * kBlockN + v * I::W);
          if (I::kUnsignedA) t = I::sub(t, I::shl7(I::load(ws + v * I::W)));  // codes were offset by 128
          const typename F::R f = I::to_float(t);
          const typename F::R sv = F::mul(xa, F::load(sc + v * I::W));
          out[v] = bi ? F::fma(f, sv, F::load(bi + v * I::W)) : F::mul(f, sv);
        }
        store_block(a.y + (m0 + r) * a.n + blk * kBlockN, out, valid);
      }
      m0 += rows;
    }
  }
#ifdef QR_AMX
  _tile_release();
#endif
}


#ifdef QR_BF16
// ---- bf16 dot products for the weight-only GEMMs (m >= kBf16Rows) -------------------------------
// x is rounded to bf16 once per call (xb [m, kp2], kp2 = k rounded up to even, zero padded); each 32-column
// block's weights are dequantized in fp32 and rounded to a bf16 panel [pairs][32 columns][2 k] (one
// 32-bit word per column and k pair: low half k = 2p, high half k = 2p + 1), the layout VDPBF16PS and
// AMX TDPBF16PS read. Products are exact in fp32, sums accumulate in fp32 (round to nearest even).
constexpr int64_t kBf16Rows = 16;
constexpr int kMrB = 12;               // 12 x 2 accumulators + 2 weight vectors + a broadcast
constexpr int64_t kPairChunk = 128;    // k pairs per panel chunk: 128 x 128 B = 16 KiB, L1 resident
thread_local Scratch t_acc;

// Rows 2p (f0) and 2p + 1 (f1) of 16 columns -> 16 words of bf16 pairs (round to nearest even).
inline __m512i bf16_pairs(__m512 f0, __m512 f1) {
  alignas(64) static const uint16_t kInterleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i packed = (__m512i)_mm512_cvtne2ps_pbh(f1, f0);  // elements 0-15: f0, 16-31: f1
  return _mm512_permutexvar_epi16(_mm512_load_si512(kInterleave), packed);
}

struct Bf16Act {
  const uint16_t* xb;  // [m, ldx] bf16 bits
  int64_t m, ldx;
};

struct ToBf16Args {
  const float* x;
  int64_t k, ldx;
  uint16_t* xb;
};

void to_bf16_task(void* ctx, int64_t r0, int64_t r1) {
  const auto& a = *static_cast<const ToBf16Args*>(ctx);
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.x + r * a.k;
    uint16_t* o = a.xb + r * a.ldx;
    for (int64_t j = 0; j < a.ldx; j += 16) {
      const int64_t cnt = imin(16, a.k - j);
      const __mmask16 in = static_cast<__mmask16>(cnt >= 16 ? 0xffff : cnt > 0 ? (1u << cnt) - 1 : 0);
      const __mmask16 out = static_cast<__mmask16>(a.ldx - j >= 16 ? 0xffff : (1u << (a.ldx - j)) - 1);
      const __m256i v = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(in, x + j));
      _mm256_mask_storeu_epi16(o + j, out, v);
    }
  }
}

// x f32 [m, k] -> bf16 [m, kp2] in the calling thread's scratch
Bf16Act to_bf16(const float* x, int64_t m, int64_t k, int threads) {
  const int64_t ldx = (k + 1) / 2 * 2;
  auto* xb = static_cast<uint16_t*>(scratch(t_act, sizeof(uint16_t) * m * ldx));
  ToBf16Args args{x, k, ldx, xb};
  parallel_for(m, m * k >= (1 << 15) ? threads : 1, to_bf16_task, &args);
  return {xb, m, ldx};
}

inline int32_t load_pair(const uint16_t* p) {
  int32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

// tile[r][:] += sum over `pairs` k pairs of x pair (row r) . panel pair
template <int MR>
__attribute__((noinline)) void bf16_kernel(const uint16_t* xb, int64_t ldx, const uint32_t* panel, int64_t pairs,
                                           float* tile) {
  __m512 acc[MR][2];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) acc[r][v] = _mm512_loadu_ps(tile + r * kBlockN + v * 16);
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(panel + p * kBlockN);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(panel + p * kBlockN + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(load_pair(xb + r * ldx + 2 * p));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 2; ++v) _mm512_storeu_ps(tile + r * kBlockN + v * 16, acc[r][v]);
}

#ifdef QR_AMX_BF16
// AMX-BF16: C tiles 0-1 (16 rows x 16 f32 columns each) accumulate in place over `chunks` x 16 k pairs;
// A = tile 2 (16 rows x 32 bf16 of x), B = tiles 3-4 (16 k pairs x 16 columns x 2 bf16: 64 bytes of the
// panel's 128-byte pair rows). Tile configuration: amx_configure (every tile 16 rows x 64 bytes).
void amx_bf16_16x32(const uint16_t* xr, int64_t ldx, const uint32_t* panel, int64_t chunks, float* tile) {
  _tile_loadd(0, tile, 4 * kBlockN);
  _tile_loadd(1, tile + 16, 4 * kBlockN);
  for (int64_t c = 0; c < chunks; ++c) {
    const uint32_t* b = panel + c * 16 * kBlockN;
    _tile_loadd(2, xr + 32 * c, 2 * ldx);
    _tile_loadd(3, b, 4 * kBlockN);
    _tile_loadd(4, b + 16, 4 * kBlockN);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, tile, 4 * kBlockN);
  _tile_stored(1, tile + 16, 4 * kBlockN);
}
#endif

// acc [m][32] += xb [m, 2 * pairs) . panel, in L1-sized chunks of k pairs
void bf16_gemm_block(const Bf16Act& xa, const uint32_t* panel, int64_t pairs, float* acc) {
  for (int64_t c0 = 0; c0 < pairs; c0 += kPairChunk) {
    const int64_t cnt = imin(kPairChunk, pairs - c0);
    const uint32_t* pc = panel + c0 * kBlockN;
    for (int64_t m0 = 0; m0 < xa.m;) {
      const uint16_t* xr = xa.xb + m0 * xa.ldx + 2 * c0;
      float* tile = acc + m0 * kBlockN;
#ifdef QR_AMX_BF16
      if (xa.m - m0 >= 16 && cnt >= 16) {  // full AMX tiles; the remaining pairs (< 16) by AVX-512 BF16
        const int64_t full = cnt / 16 * 16;
        amx_bf16_16x32(xr, xa.ldx, pc, full / 16, tile);
        if (full < cnt) {
          bf16_kernel<12>(xr + 2 * full, xa.ldx, pc + full * kBlockN, cnt - full, tile);
          bf16_kernel<4>(xr + 12 * xa.ldx + 2 * full, xa.ldx, pc + full * kBlockN, cnt - full, tile + 12 * kBlockN);
        }
        m0 += 16;
        continue;
      }
#endif
      const int rows = static_cast<int>(imin(kMrB, xa.m - m0));
      with_rows<kMrB>(rows, [&](auto r) { bf16_kernel<decltype(r)::value>(xr, xa.ldx, pc, cnt, tile); });
      m0 += rows;
    }
  }
}

// One 32-column block: weights load(kk, v) (f32, columns 16v .. 16v + 15 of row kk) -> bf16 panel,
// products in bf16, y = acc * scale + bias (scale / bias may be null).
template <class Load>
void bf16_block(const Bf16Act& xa, int64_t k, int64_t n, int64_t blk, const float* scale, const float* bias,
                float* y, const Load& load) {
  const int64_t pairs = xa.ldx / 2;
  auto* panel = static_cast<uint32_t*>(scratch(t_panel, sizeof(uint32_t) * kBlockN * pairs));
  for (int64_t p = 0; p < pairs; ++p)
    for (int v = 0; v < 2; ++v) {
      const __m512 f1 = 2 * p + 1 < k ? load(2 * p + 1, v) : _mm512_setzero_ps();
      _mm512_storeu_si512(panel + p * kBlockN + v * 16, bf16_pairs(load(2 * p, v), f1));
    }
  auto* acc = static_cast<float*>(scratch(t_acc, sizeof(float) * kBlockN * xa.m));
  std::memset(acc, 0, sizeof(float) * kBlockN * xa.m);
  bf16_gemm_block(xa, panel, pairs, acc);
  const int64_t valid = imin(kBlockN, n - blk * kBlockN);
  for (int64_t m0 = 0; m0 < xa.m; m0 += kMrF) {
    const int rows = static_cast<int>(imin(kMrF, xa.m - m0));
    store_tile(y + m0 * n + blk * kBlockN, n, rows, valid, scale, bias, acc + m0 * kBlockN);
  }
}

struct W8A16Bf16Args {
  const W8A16Args* a;
  Bf16Act xa;
};

void w8a16_bf16_task(void* ctx, int64_t b0, int64_t b1) {
  const auto& c = *static_cast<const W8A16Bf16Args*>(ctx);
  const auto& a = *c.a;
#ifdef QR_AMX_BF16
  amx_configure();
#endif
  for (int64_t blk = b0; blk < b1; ++blk) {
    const int8_t* bp = a.wp + blk * a.k * kBlockN;
    // int8 codes are exact in bf16: the per-channel scale is applied to the fp32 sums
    bf16_block(c.xa, a.k, a.n, blk, a.scales + blk * kBlockN, a.bias ? a.bias + blk * kBlockN : nullptr, a.y,
               [bp](int64_t kk, int v) { return F::i8(bp + kk * kBlockN + v * F::W); });
  }
#ifdef QR_AMX_BF16
  _tile_release();
#endif
}

struct W4A16Bf16Args {
  const W4A16Args* a;
  Bf16Act xa;
};

void w4a16_bf16_task(void* ctx, int64_t b0, int64_t b1) {
  const auto& c = *static_cast<const W4A16Bf16Args*>(ctx);
  const auto& a = *c.a;
  const int64_t ldg = (a.n + kBlockN - 1) / kBlockN * kBlockN;
#ifdef QR_AMX_BF16
  amx_configure();
#endif
  for (int64_t blk = b0; blk < b1; ++blk) {
    const uint8_t* bp = a.wp + blk * a.kp * (kBlockN / 2);
    const float* s = a.s + blk * kBlockN;
    const float* zs = a.zs + blk * kBlockN;
    const int64_t group = a.group;
    // the dequantized weight code * s + zs, rounded to bf16 as autocast rounds a bf16 weight
    bf16_block(c.xa, a.k, a.n, blk, nullptr, a.bias ? a.bias + blk * kBlockN : nullptr, a.y,
               [=](int64_t kk, int v) {
                 const int64_t g = kk / group * ldg + v * F::W;
                 return F::fma(u4_col(bp + kk * (kBlockN / 2), v), F::load(s + g), F::load(zs + g));
               });
  }
#ifdef QR_AMX_BF16
  _tile_release();
#endif
}
#endif  // QR_BF16

// ---- entry points --------------------------------------------------------------------------------

inline int clamp_threads(int threads, int64_t m, int64_t n, int64_t k) {
  // Below ~64k multiply-adds the wake-up of a second thread costs more than it saves.
  if (m * n * k < (int64_t{1} << 16)) return 1;
  return threads < 1 ? 1 : threads;
}

void w8a16(const float* x, int64_t m, int64_t k, const int8_t* wp, const float* scales, const float* bias,
           int64_t n, float* y, int threads) {
  W8A16Args args{x, m, k, wp, scales, bias, n, y};
#ifdef QR_BF16
  if (m >= kBf16Rows) {
    const int t = clamp_threads(threads, m, n, k);
    W8A16Bf16Args c{&args, to_bf16(x, m, k, t)};
    parallel_for((n + kBlockN - 1) / kBlockN, t, w8a16_bf16_task, &c);
    return;
  }
#endif
  parallel_for((n + kBlockN - 1) / kBlockN, clamp_threads(threads, m, n, k), w8a16_task, &args);
}

void w4a16(const float* x, int64_t m, int64_t k, const uint8_t* wp, int64_t kp, const float* s, const float* zs,
           int64_t group, const float* bias, int64_t n, float* y, int threads) {
#ifdef QR_BF16
  if (m >= kBf16Rows) {
    const int t = clamp_threads(threads, m, n, k);
    W4A16Args args{x, m, k, wp, kp, s, zs, group, bias, n, y, nullptr};
    W4A16Bf16Args c{&args, to_bf16(x, m, k, t)};
    parallel_for((n + kBlockN - 1) / kBlockN, t, w4a16_bf16_task, &c);
    return;
  }
#endif
  const int64_t groups = (k + group - 1) / group;
  float xsum[kMrF * 512];
  const float* xs = nullptr;
  if (m <= kMrF && groups <= 512) {  // the direct path's per-group sums of x, once per call
    for (int64_t r = 0; r < m; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        float t = 0.0f;
        for (int64_t kk = g * group; kk < imin(k, (g + 1) * group); ++kk) t += x[r * k + kk];
        xsum[r * groups + g] = t;
      }
    xs = xsum;
  }
  W4A16Args args{x, m, k, wp, kp, s, zs, group, bias, n, y, xs};
  parallel_for((n + kBlockN - 1) / kBlockN, clamp_threads(threads, m, n, k), w4a16_task, &args);
}

struct QuantArgs {
  const float* x;
  int64_t k, k4;
  uint8_t* q;
  float* a;
};

void quantize_task(void* ctx, int64_t r0, int64_t r1) {
  const auto& a = *static_cast<const QuantArgs*>(ctx);
  for (int64_t r = r0; r < r1; ++r) quantize_row(a.x + r * a.k, a.k, a.k4, a.q + r * a.k4, a.a + r);
}

void w8a8(const float* x, int64_t m, int64_t k, const int8_t* wp, const int32_t* wsum, const float* scales,
          const float* bias, int64_t n, float* y, int threads) {
  const int64_t k4 = (k + 3) / 4 * 4;
  auto* buf = static_cast<uint8_t*>(scratch(t_act, m * k4 + sizeof(float) * m + 64));
  float* xa = reinterpret_cast<float*>(buf + (m * k4 + 63) / 64 * 64);
  const int t = clamp_threads(threads, m, n, k);
  QuantArgs qa{x, k, k4, buf, xa};
  parallel_for(m, m * k >= (1 << 15) ? t : 1, quantize_task, &qa);
  W8A8Args args{buf, xa, m, k4, wp, wsum, scales, bias, n, y};
  parallel_for((n + kBlockN - 1) / kBlockN, t, w8a8_task, &args);
}

void quantize_rows(const float* x, int64_t m, int64_t k, int8_t* xq, float* a) {
  const int64_t k4 = (k + 3) / 4 * 4;
  uint8_t row[64 + 4];
  uint8_t* tmp = k4 <= 64 ? row : static_cast<uint8_t*>(std::malloc(k4));
  for (int64_t r = 0; r < m; ++r) {
    quantize_row(x + r * k, k, k4, tmp, a + r);
    for (int64_t j = 0; j < k; ++j) xq[r * k + j] = static_cast<int8_t>(I::kUnsignedA ? tmp[j] - 128 : tmp[j]);
  }
  if (tmp != row) std::free(tmp);
}

#include "decode_impl.h"

}  // namespace
}  // namespace qruntime::cpu::QR_NS

#include "sp24_impl.h"

namespace qruntime::cpu::QR_NS {
#ifdef QR_BF16
constexpr int kTableBf16Rows = static_cast<int>(kBf16Rows);
#else
constexpr int kTableBf16Rows = 0;
#endif
const KernelTable kTable = {
    QR_ISA_NAME, w8a16, w4a16, w8a8, quantize_rows, sp24, kTableBf16Rows, add_rms_norm, add_layer_norm, act_mul, attend,
};
}  // namespace qruntime::cpu::QR_NS
