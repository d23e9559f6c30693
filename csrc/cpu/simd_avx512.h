// AVX-512 (F, BW, VL) + VNNI traits for gemm_impl.h, shared by the AVX-512 and AMX levels. Include
// inside namespace qruntime::cpu::<level> { namespace { ... } } of a TU built with those -m flags.

struct F {
  using R = __m512;
  static constexpr int W = 16;
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R set1(float v) { return _mm512_set1_ps(v); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static R i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static R u4(const uint8_t* p, bool hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    v = hi ? _mm512_srli_epi32(v, 4) : _mm512_and_si512(v, _mm512_set1_epi32(15));
    return _mm512_cvtepi32_ps(v);
  }
};

// vpdpbusd: unsigned activations (codes + 128) times signed weights, four products a lane.
struct I {
  using R = __m512i;
  using A = __m512i;
  using B = __m512i;
  static constexpr int W = 16;
  static constexpr bool kUnsignedA = true;
  static R zero() { return _mm512_setzero_si512(); }
  static A prep(int32_t word) { return _mm512_set1_epi32(word); }
  static B loadb(const int8_t* p) { return _mm512_loadu_si512(p); }
  static R dot(R acc, A a, B b) { return _mm512_dpbusd_epi32(acc, a, b); }
  static R load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static void store(int32_t* p, R v) { _mm512_storeu_si512(p, v); }
  static R sub(R a, R b) { return _mm512_sub_epi32(a, b); }
  static R shl7(R a) { return _mm512_slli_epi32(a, 7); }
  static F::R to_float(R a) { return _mm512_cvtepi32_ps(a); }
};

// 2:4 sparse (sp24_impl.h): x[4g .. 4g+3] replicated in the four 128-bit lanes, so vpermps, which reads
// the low 4 bits of each index, picks x[4g + (idx & 3)] whatever bits 3:2 hold: no masking.
struct S {
  using X = __m512;
  using M = __m512i;
  static X xrep(const float* p) { return _mm512_broadcast_f32x4(_mm_loadu_ps(p)); }
  static M loadm(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static M shr(M v, int bits) { return _mm512_srli_epi32(v, static_cast<unsigned>(bits)); }
  static F::R gather(X x, M idx) { return _mm512_permutexvar_ps(idx, x); }
  static F::R bf16(const uint16_t* p) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
};

constexpr int kMrF = 12;  // 12 x 2 accumulators + 2 weight vectors + a broadcast of 32 zmm
constexpr int kMrI = 12;
constexpr int kMrS = 8;  // 8 x 2 accumulators, 8 broadcasts, a value, 2 metadata words, a gather

void quantize_row(const float* x, int64_t k, int64_t k4, uint8_t* q, float* a) {
  __m512 mx = _mm512_setzero_ps();
  __mmask16 nan = 0;  // max_ps drops NaNs: they are tracked apart
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  const __mmask16 tail = static_cast<__mmask16>((1u << (k - j)) - 1);
  if (j < k) {
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + j);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
  }
  const float amax = _mm512_reduce_max_ps(mx);
  if (nan || !(amax <= FLT_MAX)) {  // a NaN / Inf in the row: every output of the row is NaN
    *a = NAN;
    for (j = 0; j < k4; ++j) q[j] = 128;
    return;
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *a = amax / 127.0f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
  for (j = 0; j < k; j += 16) {
    const int64_t cnt = k - j < 16 ? k - j : 16;
    const __mmask16 m = static_cast<__mmask16>(cnt == 16 ? 0xffff : (1u << cnt) - 1);
    // cvtps rounds with MXCSR: round-half-to-even, as torch.round
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + j), vinv));
    v = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(v, lo), hi), off);
    _mm_mask_storeu_epi8(q + j, m, _mm512_cvtepi32_epi8(v));
  }
  for (j = k; j < k4; ++j) q[j] = 128;
}

