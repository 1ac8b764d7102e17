// Block-wide building blocks of the CUDA sampling kernels (verify,
// markov_sample): reductions broadcast to every thread and the inverse-CDF
// draw over fixed-point masses (sampling.h), so each kernel states only its
// own passes over the vocabulary.
#pragma once
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "dspark/sampling.h"

namespace dspark {

using U64 = unsigned long long;

struct MaxOp {
  __device__ float operator()(float a, float b) const { return a > b ? a : b; }
};
struct MinOp {
  __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; }
};

template <int kThreads>
struct BlockOps {
  struct Storage {
    union {
      typename cub::BlockReduce<float, kThreads>::TempStorage reduce_f;
      typename cub::BlockReduce<U64, kThreads>::TempStorage reduce_u;
      typename cub::BlockReduce<long long, kThreads>::TempStorage reduce_i;
      typename cub::BlockScan<U64, kThreads>::TempStorage scan;
    } cub;
    float f;
    U64 u;
    long long i;
  };

  // Each returns the block-wide result to every thread (and leaves `sh` free for reuse).
  static __device__ float max(float v, Storage& sh) {
    const float r = cub::BlockReduce<float, kThreads>(sh.cub.reduce_f).Reduce(v, MaxOp());
    if (threadIdx.x == 0) sh.f = r;
    __syncthreads();
    const float out = sh.f;
    __syncthreads();
    return out;
  }

  static __device__ U64 sum(U64 v, Storage& sh) {
    const U64 r = cub::BlockReduce<U64, kThreads>(sh.cub.reduce_u).Sum(v);
    if (threadIdx.x == 0) sh.u = r;
    __syncthreads();
    const U64 out = sh.u;
    __syncthreads();
    return out;
  }

  static __device__ long long min(long long v, Storage& sh) {
    const long long r = cub::BlockReduce<long long, kThreads>(sh.cub.reduce_i).Reduce(v, MinOp());
    if (threadIdx.x == 0) sh.i = r;
    __syncthreads();
    const long long out = sh.i;
    __syncthreads();
    return out;
  }

  // First v (in [0, n)) whose cumulative mass exceeds U = scaled_draw(bits, total).
  template <typename MassFn>
  static __device__ index_t draw(index_t n, uint64_t total, uint64_t bits, MassFn mass, Storage& sh) {
    return draw_at(0, n, scaled_draw(bits, total), mass, sh);
  }

  // First v in [lo, hi) whose cumulative mass (from lo) exceeds u, scanning in tiles of kThreads (thread t
  // holds v = tile start + t); u must be below the slice's total mass.
  template <typename MassFn>
  static __device__ index_t draw_at(index_t lo, index_t hi, uint64_t u, MassFn mass, Storage& sh) {
    U64 running = 0;
    if (threadIdx.x == 0) sh.i = -1;
    __syncthreads();
    for (index_t start = lo; start < hi; start += kThreads) {
      const index_t v = start + threadIdx.x;
      const U64 m = v < hi ? static_cast<U64>(mass(v)) : 0;
      U64 incl, tile_total;
      cub::BlockScan<U64, kThreads>(sh.cub.scan).InclusiveSum(m, incl, tile_total);
      if (m > 0 && running + incl > u && running + incl - m <= u) sh.i = v;
      __syncthreads();
      if (sh.i >= 0) break;
      running += tile_total;
    }
    const index_t out = sh.i;
    __syncthreads();
    return out >= 0 ? out : hi - 1;  // hi - 1 only if u were not below the slice's exact total
  }
};

}  // namespace dspark
