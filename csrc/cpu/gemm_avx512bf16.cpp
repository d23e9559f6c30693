// AVX-512 BF16 level: the AVX-512 VNNI kernels, with W8A16 and W4A16 at m >= 16 rows multiplying in
// bf16 (VDPBF16PS over a dequantized bf16 panel, fp32 accumulation; see gemm_impl.h). Built with the
// AVX-512 flags plus -mavx512bf16; runs only when dispatch.cpp finds AVX512_BF16 on the running CPU.
#include <cfloat>
#include <cmath>
#include <immintrin.h>

#include "kernels.h"

#define QR_NS avx512bf16
#define QR_ISA_NAME "avx512_bf16"
#define QR_BF16 1

namespace qruntime::cpu::avx512bf16 {
namespace {
#include "simd_avx512.h"
}  // namespace
}  // namespace qruntime::cpu::avx512bf16

#include "gemm_impl.h"

namespace qruntime::cpu {
const KernelTable& table_avx512bf16() { return avx512bf16::kTable; }
}  // namespace qruntime::cpu
