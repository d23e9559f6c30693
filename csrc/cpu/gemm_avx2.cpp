// AVX2 + FMA level (no VNNI: int8 dot products with vpmaddubsw on |a| and sign-transferred weights).
#include <cfloat>
#include <cmath>
#include <immintrin.h>

#include "kernels.h"

#define QR_NS avx2
#define QR_ISA_NAME "avx2"

namespace qruntime::cpu::avx2 {
namespace {

struct F {
  using R = __m256;
  static constexpr int W = 8;
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R set1(float v) { return _mm256_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static R i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static R u4(const uint8_t* p, bool hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    v = hi ? _mm256_srli_epi32(v, 4) : _mm256_and_si256(v, _mm256_set1_epi32(15));
    return _mm256_cvtepi32_ps(v);
  }
};

// Signed activations in [-127, 127]: |a| * sign(b, a) = a * b, and the pair sums of vpmaddubsw stay
// below 2 * 127 * 128 < 32767 (no saturation).
struct I {
  using R = __m256i;
  struct A {
    __m256i a, abs;
  };
  using B = __m256i;
  static constexpr int W = 8;
  static constexpr bool kUnsignedA = false;
  static R zero() { return _mm256_setzero_si256(); }
  static A prep(int32_t word) {
    const __m256i a = _mm256_set1_epi32(word);
    return {a, _mm256_abs_epi8(a)};
  }
  static B loadb(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static R dot(R acc, const A& a, B bv) {
    const __m256i p16 = _mm256_maddubs_epi16(a.abs, _mm256_sign_epi8(bv, a.a));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  static R load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store(int32_t* p, R v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
  static R sub(R a, R b) { return _mm256_sub_epi32(a, b); }
  static R shl7(R a) { return _mm256_slli_epi32(a, 7); }
  static F::R to_float(R a) { return _mm256_cvtepi32_ps(a); }
};

// 2:4 sparse (sp24_impl.h): x[4g .. 4g+3] in both 128-bit halves; vpermps reads the low 3 bits of an
// index, so bit 2 picks a half holding the same four values.
struct S {
  using X = __m256;
  using M = __m256i;
  static X xrep(const float* p) { return _mm256_broadcast_ps(reinterpret_cast<const __m128*>(p)); }
  static M loadm(const uint32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static M shr(M v, int bits) { return _mm256_srli_epi32(v, bits); }
  static F::R gather(X x, M idx) { return _mm256_permutevar8x32_ps(x, idx); }
  static F::R bf16(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
};

constexpr int kMrF = 3;  // 3 x 4 accumulators + 4 weight vectors of 16 ymm
constexpr int kMrI = 2;
constexpr int kMrS = 2;  // 2 x 4 accumulators, 2 broadcasts, a value, a metadata word, a gather of 16 ymm

void quantize_row(const float* x, int64_t k, int64_t k4, uint8_t* q, float* a) {
  const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();  // max_ps drops NaNs: tracked apart
  int64_t j = 0;
  for (; j + 8 <= k; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, _mm256_and_ps(v, sign));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float amax = 0.0f;
  bool bad = _mm256_movemask_ps(nan) != 0;
  for (float v : lanes) amax = v > amax ? v : amax;
  for (; j < k; ++j) {
    const float v = x[j] < 0 ? -x[j] : x[j];
    bad |= v != v;
    amax = v > amax ? v : amax;
  }
  if (bad || !(amax <= FLT_MAX)) {  // a NaN / Inf in the row: every output of the row is NaN
    *a = NAN;
    for (j = 0; j < k4; ++j) q[j] = 0;
    return;
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *a = amax / 127.0f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  alignas(32) int32_t codes[8];
  for (j = 0; j + 8 <= k; j += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vinv));  // round half to even
    _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_min_epi32(_mm256_max_epi32(v, lo), hi));
    for (int i = 0; i < 8; ++i) q[j + i] = static_cast<uint8_t>(static_cast<int8_t>(codes[i]));
  }
  for (; j < k; ++j) {
    int32_t v = _mm_cvtss_si32(_mm_set_ss(x[j] * inv));
    v = v < -127 ? -127 : (v > 127 ? 127 : v);
    q[j] = static_cast<uint8_t>(static_cast<int8_t>(v));
  }
  for (j = k; j < k4; ++j) q[j] = 0;
}

}  // namespace
}  // namespace qruntime::cpu::avx2

#include "gemm_impl.h"

namespace qruntime::cpu {
const KernelTable& table_avx2() { return avx2::kTable; }
}  // namespace qruntime::cpu
