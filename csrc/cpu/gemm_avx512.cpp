// AVX-512 (F, BW, VL) + VNNI level. Built with exactly those -m flags (setup.py); runs only when
// dispatch.cpp finds them on the running CPU.
#include <cfloat>
#include <cmath>
#include <immintrin.h>

#include "kernels.h"

#define QR_NS avx512
#define QR_ISA_NAME "avx512_vnni"

namespace qruntime::cpu::avx512 {
namespace {
#include "simd_avx512.h"
}  // namespace
}  // namespace qruntime::cpu::avx512

#include "gemm_impl.h"

namespace qruntime::cpu {
const KernelTable& table_avx512() { return avx512::kTable; }
}  // namespace qruntime::cpu
