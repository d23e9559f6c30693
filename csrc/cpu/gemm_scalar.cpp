// Portable level: plain C++ (the compiler may still use the baseline SIMD of the target, e.g. SSE2).
#include <cfloat>
#include <cmath>
#include <cstring>

#include "kernels.h"

#define QR_NS scalar
#define QR_ISA_NAME "scalar"

namespace qruntime::cpu::scalar {
namespace {

struct F {
  using R = float;
  static constexpr int W = 1;
  static R zero() { return 0.0f; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R v) { *p = v; }
  static R set1(float v) { return v; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R mul(R a, R b) { return a * b; }
  static R add(R a, R b) { return a + b; }
  static R i8(const int8_t* p) { return static_cast<float>(*p); }
  static R u4(const uint8_t* p, bool hi) { return static_cast<float>(hi ? *p >> 4 : *p & 15); }
};

struct I {
  using R = int32_t;
  using A = int32_t;
  using B = const int8_t*;
  static constexpr int W = 1;
  static constexpr bool kUnsignedA = false;
  static R zero() { return 0; }
  static A prep(int32_t word) { return word; }
  static B loadb(const int8_t* p) { return p; }
  static R dot(R acc, A a, B b) {
    int8_t av[4];
    std::memcpy(av, &a, 4);
    return acc + av[0] * b[0] + av[1] * b[1] + av[2] * b[2] + av[3] * b[3];
  }
  static R load(const int32_t* p) { return *p; }
  static void store(int32_t* p, R v) { *p = v; }
  static R sub(R a, R b) { return a - b; }
  static R shl7(R a) { return a * 128; }
  static F::R to_float(R a) { return static_cast<float>(a); }
};

// 2:4 sparse (sp24_impl.h): a "replicated" x is just a pointer to the group's four values.
struct S {
  using X = const float*;
  using M = uint32_t;
  static X xrep(const float* p) { return p; }
  static M loadm(const uint32_t* p) { return *p; }
  static M shr(M v, int bits) { return v >> bits; }
  static F::R gather(X x, M idx) { return x[idx & 3]; }
  static F::R bf16(const uint16_t* p) {
    const uint32_t bits = static_cast<uint32_t>(*p) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
};

constexpr int kMrF = 4;
constexpr int kMrI = 4;
constexpr int kMrS = 4;

void quantize_row(const float* x, int64_t k, int64_t k4, uint8_t* q, float* a) {
  float amax = 0.0f;
  bool bad = false;
  for (int64_t j = 0; j < k; ++j) {
    bad |= x[j] != x[j];
    amax = std::fabs(x[j]) > amax ? std::fabs(x[j]) : amax;
  }
  if (bad || !(amax <= FLT_MAX)) {  // a NaN / Inf in the row: every output of the row is NaN
    *a = NAN;
    for (int64_t j = 0; j < k4; ++j) q[j] = 0;
    return;
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  *a = amax / 127.0f;
  for (int64_t j = 0; j < k; ++j) {
    float v = std::nearbyint(x[j] * inv);  // round half to even (default rounding mode)
    v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
    q[j] = static_cast<uint8_t>(static_cast<int8_t>(v));
  }
  for (int64_t j = k; j < k4; ++j) q[j] = 0;
}

}  // namespace
}  // namespace qruntime::cpu::scalar

#include "gemm_impl.h"

namespace qruntime::cpu {
const KernelTable& table_scalar() { return scalar::kTable; }
}  // namespace qruntime::cpu
