// AMX-BF16 level (opt-in: QRUNTIME_CPU_ISA=amx_bf16): the AMX-INT8 kernels, with the weight-only GEMMs'
// bf16 products (m >= 16) in AMX tiles: TDPBF16PS over 16 rows x 32 columns x 32 k, the remaining k pairs
// and row tails by VDPBF16PS. Built with the AMX flags plus -mamx-bf16; never chosen by default until it
// has been validated on AMX hardware (dispatch.cpp, best_isa).
#include <cfloat>
#include <cmath>
#include <immintrin.h>

#include "kernels.h"

#define QR_NS amxbf16
#define QR_ISA_NAME "amx_bf16"
#define QR_AMX 1
#define QR_BF16 1
#define QR_AMX_BF16 1

namespace qruntime::cpu::amxbf16 {
namespace {
#include "simd_avx512.h"
}  // namespace
}  // namespace qruntime::cpu::amxbf16

#include "gemm_impl.h"

namespace qruntime::cpu {
const KernelTable& table_amx_bf16() { return amxbf16::kTable; }
}  // namespace qruntime::cpu
