// CUDA kernels of `append_kv` (one CTA per new token) and `kv_rollback` (one
// CTA per request, layer and K/V, all layers in one launch). Both copy bytes
// in the widest unit (16, 8, 4, 2 or 1 bytes) that every row, stride and base
// pointer allows. Index values are checked in the kernels: an append slot
// outside [0, num_slots) is skipped; a rollback request failing
// RollbackProblem::request_ok is left untouched (length included).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <initializer_list>

#include "../bindings/paged_kv.h"
#include "dspark/paged_kv.h"

namespace dspark {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxLayersPerLaunch = 128;

// Largest power-of-two unit (<= 16 bytes) dividing every byte count and address given.
int copy_unit(std::initializer_list<uint64_t> values) {
  uint64_t all = 16;
  for (uint64_t v : values) all |= v;
  return static_cast<int>(all & (~all + 1));  // lowest set bit
}

template <int kUnit>
struct UnitType;
template <> struct UnitType<16> { using type = uint4; };
template <> struct UnitType<8> { using type = uint2; };
template <> struct UnitType<4> { using type = uint32_t; };
template <> struct UnitType<2> { using type = uint16_t; };
template <> struct UnitType<1> { using type = uint8_t; };

template <typename Fn>
void with_unit(int unit, Fn fn) {
  switch (unit) {
    case 16: fn(UnitType<16>{}); break;
    case 8: fn(UnitType<8>{}); break;
    case 4: fn(UnitType<4>{}); break;
    case 2: fn(UnitType<2>{}); break;
    default: fn(UnitType<1>{}); break;
  }
}

template <typename U>
__global__ void __launch_bounds__(kThreads) append_kernel(AppendProblem P) {
  const index_t t = blockIdx.x;
  const index_t slot = P.slot_mapping[t];
  if (slot < 0 || slot >= P.num_slots) return;
  const index_t unit = sizeof(U), row_units = P.head_dim * P.elem_bytes / unit;
  const char* k = static_cast<const char*>(P.k);
  const char* v = static_cast<const char*>(P.v);
  U* kc = static_cast<U*>(P.k_cache);
  U* vc = static_cast<U*>(P.v_cache);
  for (index_t e = threadIdx.x; e < P.num_kv_heads * row_units; e += blockDim.x) {
    const index_t h = e / row_units, u = e % row_units;
    const index_t dst = (slot * P.num_kv_heads + h) * row_units + u;
    kc[dst] = reinterpret_cast<const U*>(k + (t * P.k_stride_t + h * P.k_stride_h) * P.elem_bytes)[u];
    vc[dst] = reinterpret_cast<const U*>(v + (t * P.v_stride_t + h * P.v_stride_h) * P.elem_bytes)[u];
  }
}

struct LayerPointers {
  char* p[2 * kMaxLayersPerLaunch];  // K layers, then V layers
};

// Grid (request, layer, K or V). Thread e copies unit e of every moved slot,
// in increasing i: sources are strictly increasing, so the unit a thread
// reads was not yet overwritten (only this thread writes it).
template <typename U>
__global__ void __launch_bounds__(kThreads)
    rollback_kernel(RollbackProblem P, LayerPointers layers, int count, bool set_lengths, bool copy) {
  const index_t b = blockIdx.x;
  const int layer = blockIdx.y, which = blockIdx.z;
  if (!P.request_ok(b)) return;
  if (set_lengths && layer == 0 && which == 0 && threadIdx.x == 0)
    P.seq_lens[b] = static_cast<int32_t>(P.block_start[b] + P.num_accepted[b]);
  if (!copy) return;
  const index_t slot_units = P.kv.slot_elems() * P.elem_bytes / static_cast<index_t>(sizeof(U));
  U* base = reinterpret_cast<U*>(layers.p[which * count + layer]);
  const index_t start = P.block_start[b];
  for (index_t i = 0; i < P.num_accepted[b]; ++i) {
    const index_t src = P.source(b, i), dst = start + i;
    if (src == dst) continue;
    const U* from = base + P.kv.slot(b, src) * slot_units;
    U* to = base + P.kv.slot(b, dst) * slot_units;
    for (index_t e = threadIdx.x; e < slot_units; e += blockDim.x) to[e] = from[e];
  }
}

}  // namespace

void append_kv_cuda_launch(const AppendProblem& P) {
  if (P.num_tokens == 0) return;
  TORCH_CHECK(P.num_tokens <= 0x7FFFFFFF, "append_kv: too many tokens for one launch");
  const uint64_t eb = P.elem_bytes;
  const int unit = copy_unit({P.head_dim * eb, P.k_stride_t * eb, P.k_stride_h * eb, P.v_stride_t * eb,
                              P.v_stride_h * eb, reinterpret_cast<uint64_t>(P.k), reinterpret_cast<uint64_t>(P.v),
                              reinterpret_cast<uint64_t>(P.k_cache), reinterpret_cast<uint64_t>(P.v_cache)});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  with_unit(unit, [&](auto tag) {
    using U = typename decltype(tag)::type;
    append_kernel<U><<<static_cast<unsigned>(P.num_tokens), kThreads, 0, stream>>>(P);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void kv_rollback_cuda_launch(const RollbackProblem& P) {
  if (P.kv.batch == 0) return;
  TORCH_CHECK(P.kv.batch <= 0x7FFFFFFF, "kv_rollback: too many requests for one launch");
  uint64_t unit_args_bytes = P.kv.slot_elems() * P.elem_bytes;
  for (index_t l = 0; l < P.num_layers; ++l)
    unit_args_bytes |= reinterpret_cast<uint64_t>(P.k_layers[l]) | reinterpret_cast<uint64_t>(P.v_layers[l]);
  const int unit = copy_unit({unit_args_bytes});
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Layers in chunks of kMaxLayersPerLaunch (pointers travel as kernel parameters: graph-safe, no copy);
  // one launch for every model up to 128 layers. Identity rollbacks only set lengths.
  const bool copy = P.accept_index != nullptr && P.num_layers > 0;
  const index_t chunks = copy ? (P.num_layers + kMaxLayersPerLaunch - 1) / kMaxLayersPerLaunch : 1;
  for (index_t chunk = 0; chunk < chunks; ++chunk) {
    const index_t first = chunk * kMaxLayersPerLaunch;
    const int count = copy ? static_cast<int>(std::min<index_t>(kMaxLayersPerLaunch, P.num_layers - first)) : 1;
    LayerPointers layers{};
    for (int l = 0; copy && l < count; ++l) {
      layers.p[l] = P.k_layers[first + l];
      layers.p[count + l] = P.v_layers[first + l];
    }
    const dim3 grid(static_cast<unsigned>(P.kv.batch), count, copy ? 2 : 1);
    with_unit(unit, [&](auto tag) {
      using U = typename decltype(tag)::type;
      rollback_kernel<U><<<grid, kThreads, 0, stream>>>(P, layers, count, chunk == 0, copy);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace dspark
