// Run-time choice among the per-ISA builds of a CPU kernel (cmake/cpu_isa.cmake).
#pragma once
#include <cstdlib>
#include <cstring>

namespace dspark::cpu {

enum class Isa { generic, avx2, avx512 };

inline Isa detected_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
#endif
  return Isa::generic;
}

// The best build the CPU runs; DSPARK_CPU_ISA=generic|avx2 caps it, so that
// tests exercise every build on one machine (a cap above the CPU is ignored).
inline Isa best_isa() {
  static const Isa isa = [] {
    const Isa detected = detected_isa();
    const char* cap = std::getenv("DSPARK_CPU_ISA");
    if (cap == nullptr) return detected;
    if (std::strcmp(cap, "generic") == 0) return Isa::generic;
    if (std::strcmp(cap, "avx2") == 0 && detected != Isa::generic) return Isa::avx2;
    return detected;
  }();
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::avx512 ? "avx512" : (isa == Isa::avx2 ? "avx2" : "generic");
}

}  // namespace dspark::cpu

// Declares `fn` in the three ISA namespaces; DSPARK_ISA_DISPATCH(fn)(args...) calls the best.
#define DSPARK_DECLARE_ISA_FN(ret, fn, params)      \
  namespace dspark::cpu::generic { ret fn params; } \
  namespace dspark::cpu::avx2 { ret fn params; }    \
  namespace dspark::cpu::avx512 { ret fn params; }

#define DSPARK_ISA_DISPATCH(fn)                                             \
  (::dspark::cpu::best_isa() == ::dspark::cpu::Isa::avx512 ? &::dspark::cpu::avx512::fn \
   : ::dspark::cpu::best_isa() == ::dspark::cpu::Isa::avx2 ? &::dspark::cpu::avx2::fn   \
                                                           : &::dspark::cpu::generic::fn)
