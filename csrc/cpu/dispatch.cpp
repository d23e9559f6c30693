// Run-time ISA selection: the CPU that runs decides, never the build machine. QRUNTIME_CPU_ISA is read
// on the Python side (qruntime/_ext.py) and applied through set_isa.
#include <atomic>
#include <cstring>

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
  }
  return false;
#else
  return isa == Isa::kScalar;
#endif
}

Isa best_isa() {
  for (int i = kNumIsa - 1; i > 0; --i) {
    if (isa_supported(static_cast<Isa>(i))) return static_cast<Isa>(i);
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
#if defined(__x86_64__) || defined(__i386__)
    case Isa::kAvx512Vnni: return table_avx512();
    case Isa::kAvx2: return table_avx2();
#endif
    default: return table_scalar();
  }
}

}  // namespace qruntime::cpu
