// Portability macros for headers shared by the CPU and CUDA kernels.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define DSPARK_HD __host__ __device__ __forceinline__
#else
// Always inlined on the host: these headers are compiled into the generic, AVX2 and AVX-512 objects,
// and an out-of-line copy shared through the linker could carry AVX-512 code into generic callers.
#define DSPARK_HD [[gnu::always_inline]] inline
#endif

namespace dspark {

// Numbers that index the vocabulary, the batch or a cache: 64-bit so that
// B * (K + 1) * V never overflows.
using index_t = int64_t;

// Floating-point storage types the kernels read directly.
enum class FloatCode : int32_t { f32 = 0, bf16 = 1, f16 = 2 };

}  // namespace dspark
