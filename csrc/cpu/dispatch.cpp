// Run-time ISA selection: the CPU that runs decides, never the build machine. QRUNTIME_CPU_ISA is read
// on the Python side (qruntime/_ext.py) and applied through set_isa.
#include <atomic>
#include <cstring>
#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"

namespace qruntime::cpu {
namespace {
std::atomic<int> g_isa{-1};
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kAmxInt8: return "amx_int8";
    case Isa::kAmxBf16: return "amx_bf16";
  }
  return "unknown";
}

bool isa_from_name(const char* name, Isa* out) {
  for (int i = 0; i < kNumIsa; ++i) {
    if (std::strcmp(name, isa_name(static_cast<Isa>(i))) == 0) {
      *out = static_cast<Isa>(i);
      return true;
    }
  }
  return false;
}

#if defined(__x86_64__)
namespace {
// AMX: CPUID.(7,0):EDX bits 24 (AMX-TILE) and 25 (AMX-INT8), the OS enables the tile state in XCR0
// (bits 17, 18), and Linux grants this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_available() {
  static const bool ok = [] {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

// AMX-BF16: CPUID.(7,0):EDX bit 22, on top of what AMX-INT8 needs.
bool amx_bf16_available() {
  unsigned a, b, c, d;
  return amx_available() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1);
}
}  // namespace
#endif

bool isa_compiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2:
    case Isa::kAvx512Vnni:
#if defined(__x86_64__) || defined(__i386__)
      return true;
#else
      return false;
#endif
    case Isa::kAvx512Bf16:
#if defined(QR_HAVE_AVX512_BF16)
      return true;
#else
      return false;
#endif
    case Isa::kAmxInt8:
#if defined(QR_HAVE_AMX)
      return true;
#else
      return false;
#endif
    case Isa::kAmxBf16:
#if defined(QR_HAVE_AMX_BF16)
      return true;
#else
      return false;
#endif
  }
  return false;
}

bool isa_supported(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the register state (XCR0).
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kScalar: return true;
    case Isa::kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case Isa::kAvx512Bf16:
#if defined(QR_HAVE_AVX512_BF16)
      return isa_supported(Isa::kAvx512Vnni) && __builtin_cpu_supports("avx512bf16");
#else
      return false;
#endif
    case Isa::kAmxInt8:
#if defined(QR_HAVE_AMX) && defined(__x86_64__)
      return isa_supported(Isa::kAvx512Bf16) && amx_available();
#else
      return false;
#endif
    case Isa::kAmxBf16:
#if defined(QR_HAVE_AMX_BF16) && defined(__x86_64__)
      return isa_supported(Isa::kAmxInt8) && amx_bf16_available();
#else
      return false;
#endif
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

// The highest level this CPU and OS run, AMX-INT8 included where the kernel grants tile permission;
// never an opt-in level (AMX-BF16).
Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i) {
    if (static_cast<Isa>(i) != Isa::kAmxBf16 && isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
  }
  return Isa::kScalar;
}

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    v = static_cast<int>(best_isa());
    g_isa.store(v, std::memory_order_relaxed);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) { g_isa.store(static_cast<int>(isa), std::memory_order_relaxed); }

const KernelTable& current_table() {
  switch (current_isa()) {
#if defined(QR_HAVE_AMX_BF16)
    case Isa::kAmxBf16: return table_amx_bf16();
#endif
#if defined(QR_HAVE_AMX)
    case Isa::kAmxInt8: return table_amx();
#endif
#if defined(QR_HAVE_AVX512_BF16)
    case Isa::kAvx512Bf16: return table_avx512bf16();
#endif
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512Vnni: return table_avx512();
    case Isa::kAvx2: return table_avx2();
#endif
    default: return table_scalar();
  }
}

}  // namespace qruntime::cpu
