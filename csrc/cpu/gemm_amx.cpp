// AMX-INT8 level: the AVX-512 BF16 kernels, with W8A8 tiles of 16 rows x 32 columns x 64 k computed by
// TDPBUSD on the AMX tile unit (the K remainder and row tails by VNNI). Built with -mamx-tile -mamx-int8
// plus the AVX-512 and AVX512-BF16 flags; selected only when dispatch.cpp has found AMX on the running
// CPU and the kernel has granted tile permission (arch_prctl ARCH_REQ_XCOMP_PERM).
#include <cfloat>
#include <cmath>
#include <immintrin.h>

#include "kernels.h"

#define QR_NS amx
#define QR_ISA_NAME "amx_int8"
#define QR_AMX 1
#define QR_BF16 1

namespace qruntime::cpu::amx {
namespace {
#include "simd_avx512.h"
}  // namespace
}  // namespace qruntime::cpu::amx

#include "gemm_impl.h"

namespace qruntime::cpu {
const KernelTable& table_amx() { return amx::kTable; }
}  // namespace qruntime::cpu
