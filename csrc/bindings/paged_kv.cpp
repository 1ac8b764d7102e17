// torch.ops.dspark.{append_kv, draft_block_attention, kv_rollback}: schemas,
// argument checks, CPU / CUDA / Meta implementations; plus the _check_* ops
// that validate index tensors on the host (the python wrappers' check=True
// on CUDA, where the kernels cannot raise without a host sync).
#include "paged_kv.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "checks.h"

#if defined(DSPARK_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#endif
#include "dspark/cpu_isa.h"
#include "dspark/paged_kv_cpu.h"

DSPARK_DECLARE_ISA_FN(void, block_attention_item,
                      (const dspark::BlockAttentionProblem& P, dspark::index_t b, dspark::index_t h,
                       dspark::index_t chunk, dspark::index_t split, float* scratch, float* partial))
DSPARK_DECLARE_ISA_FN(void, block_attention_combine,
                      (const dspark::BlockAttentionProblem& P, dspark::index_t b, dspark::index_t h,
                       dspark::index_t chunk, float* partials))
DSPARK_DECLARE_ISA_FN(void, append_tokens, (const dspark::AppendProblem& P, dspark::index_t begin, dspark::index_t end))
DSPARK_DECLARE_ISA_FN(void, rollback_request_layer,
                      (const dspark::RollbackProblem& P, dspark::index_t b, dspark::index_t layer))

namespace dspark {
namespace {

// Meta tensors (torch.compile tracing) have no data.
template <typename T = void>
T* ptr(const at::Tensor& t) {
  return t.is_meta() ? nullptr : static_cast<T*>(t.data_ptr());
}

// [num_pages, page_size, Hkv, D] caches, contiguous, on `device`, both alike.
void check_cache_pair(const at::Tensor& k_cache, const at::Tensor& v_cache, const char* op, c10::Device device) {
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [num_pages, page_size, num_kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.device() == device, op, ": k_cache is on ", k_cache.device(), " but the op runs on ", device);
  TORCH_CHECK(v_cache.device() == device, op, ": v_cache is on ", v_cache.device(), " but the op runs on ", device);
  TORCH_CHECK(v_cache.sizes().equals(k_cache.sizes()), op, ": v_cache must have k_cache's shape ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache must have k_cache's dtype ",
              k_cache.scalar_type(), ", got ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous(), op, ": k_cache must be contiguous");
  TORCH_CHECK(v_cache.is_contiguous(), op, ": v_cache must be contiguous");
  for (int d = 0; d < 4; ++d) TORCH_CHECK(k_cache.size(d) >= 1, op, ": k_cache has an empty dimension ", k_cache.sizes());
}

void check_index(const at::Tensor& t, const char* op, const char* name, c10::Device device,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is required");
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  check_tensor(t, name, device, at::kInt, shape);
}

PagedLayout layout_of(const at::Tensor& k_cache, const at::Tensor& page_table) {
  PagedLayout kv;
  kv.batch = page_table.size(0);
  kv.max_pages = page_table.size(1);
  kv.num_pages = k_cache.size(0);
  kv.page_size = k_cache.size(1);
  kv.num_kv_heads = k_cache.size(2);
  kv.head_dim = k_cache.size(3);
  kv.page_table = ptr<const int32_t>(page_table);
  return kv;
}

}  // namespace

BlockAttentionProblem check_block_attention_args(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& page_table,
                                                 const at::Tensor& seq_lens, const at::Tensor& cu_q_lens,
                                                 bool causal, std::optional<double> scale, int64_t max_block_rows,
                                                 at::Tensor* out) {
  constexpr const char* op = "draft_block_attention";
  TORCH_CHECK(q.dim() == 3, op, ": q must be [T, Hq, D], got ", q.sizes());
  const auto device = q.device();
  const FloatCode dtype = float_code(q, "q");
  TORCH_CHECK(q.size(2) <= 1 || q.stride(2) == 1, op, ": q must be contiguous in the head dim");
  check_cache_pair(k_cache, v_cache, op, device);
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(), op, ": k_cache must have q's dtype ", q.scalar_type(),
              ", got ", k_cache.scalar_type());
  const int64_t T = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D, op, ": k_cache head_dim ", k_cache.size(3), " differs from q's ", D);
  TORCH_CHECK(Hq >= 1 && Hq % Hkv == 0, op, ": q has Hq = ", Hq,
              " heads, which must be a positive multiple of the cache's num_kv_heads = ", Hkv);
  TORCH_CHECK(D % 16 == 0 && D <= 512, op, ": head_dim must be a multiple of 16 up to 512, got ", D);
  TORCH_CHECK(page_table.dim() == 2, op, ": page_table must be [B, max_pages], got ", page_table.sizes());
  const int64_t B = page_table.size(0);
  check_index(page_table, op, "page_table", device, {B, page_table.size(1)});
  check_index(seq_lens, op, "seq_lens", device, {B});
  check_index(cu_q_lens, op, "cu_q_lens", device, {B + 1});
  const double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(D));
  TORCH_CHECK(std::isfinite(s), op, ": scale must be finite, got ", s);
  TORCH_CHECK(max_block_rows >= 1, op, ": max_block_rows must be >= 1, got ", max_block_rows);

  BlockAttentionProblem P;
  P.kv = layout_of(k_cache, page_table);
  P.num_tokens = T;
  P.num_q_heads = Hq;
  P.q = ptr<const void>(q);
  P.q_stride_t = q.stride(0);
  P.q_stride_h = q.stride(1);
  P.k_cache = ptr<const void>(k_cache);
  P.v_cache = ptr<const void>(v_cache);
  P.dtype = dtype;
  P.seq_lens = ptr<const int32_t>(seq_lens);
  P.cu_q_lens = ptr<const int32_t>(cu_q_lens);
  P.causal = causal;
  P.scale = static_cast<float>(s);
  P.max_block_rows = max_block_rows;
  *out = at::empty({T, Hq, D}, q.options());
  P.out = ptr<void>(*out);
  return P;
}

void check_block_attention_metadata(const BlockAttentionProblem& P) {
  constexpr const char* op = "draft_block_attention";
  const PagedLayout& kv = P.kv;
  TORCH_CHECK_VALUE(P.cu_q_lens[0] == 0, op, ": cu_q_lens[0] must be 0, got ", P.cu_q_lens[0]);
  for (index_t b = 0; b < kv.batch; ++b) {
    const index_t n = P.block_rows(b), len = P.seq_lens[b];
    TORCH_CHECK_VALUE(n >= 0, op, ": cu_q_lens must be non-decreasing, but cu_q_lens[", b + 1, "] = ", P.cu_q_lens[b + 1],
                " < cu_q_lens[", b, "] = ", P.cu_q_lens[b]);
    TORCH_CHECK_VALUE(n <= P.max_block_rows, op, ": request ", b, " has a query block of ", n,
                " rows (cu_q_lens[", b + 1, "] - cu_q_lens[", b, "]); at most max_block_rows = ", P.max_block_rows,
                " are allowed (raise max_block_rows for longer blocks, e.g. prefill)");
    TORCH_CHECK_VALUE(len >= n, op, ": seq_lens[", b, "] = ", len, " is shorter than its query block of ", n,
                " rows (the block's K/V must be appended first)");
    TORCH_CHECK_VALUE(len <= kv.capacity(), op, ": seq_lens[", b, "] = ", len, " exceeds the page_table capacity ",
                kv.max_pages, " pages x ", kv.page_size, " = ", kv.capacity());
    for (index_t p = 0; p * kv.page_size < len; ++p) {
      const int32_t page = kv.page_table[b * kv.max_pages + p];
      TORCH_CHECK_VALUE(kv.page_ok(page), op, ": page_table[", b, ", ", p, "] = ", page, " is outside [0, num_pages = ",
                  kv.num_pages, ")");
    }
  }
  TORCH_CHECK_VALUE(P.cu_q_lens[kv.batch] == P.num_tokens, op, ": cu_q_lens[-1] = ", P.cu_q_lens[kv.batch],
              " must equal the number of query rows q.shape[0] = ", P.num_tokens);
}

AppendProblem check_append_args(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                                const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "append_kv";
  const auto device = k_cache.device();
  check_cache_pair(k_cache, v_cache, op, device);
  const int64_t Hkv = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(k.dim() == 3 && k.size(1) == Hkv && k.size(2) == D, op, ": k must be [T, num_kv_heads, head_dim] = [T, ",
              Hkv, ", ", D, "], got ", k.sizes());
  const int64_t T = k.size(0);
  TORCH_CHECK(v.sizes().equals(k.sizes()), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(k.device() == device, op, ": k is on ", k.device(), " but the cache is on ", device);
  TORCH_CHECK(v.device() == device, op, ": v is on ", v.device(), " but the cache is on ", device);
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type(), op, ": k must have the cache's dtype ",
              k_cache.scalar_type(), ", got ", k.scalar_type());
  TORCH_CHECK(v.scalar_type() == k_cache.scalar_type(), op, ": v must have the cache's dtype ",
              k_cache.scalar_type(), ", got ", v.scalar_type());
  TORCH_CHECK(D == 1 || k.stride(2) == 1, op, ": k must be contiguous in the head dim");
  TORCH_CHECK(D == 1 || v.stride(2) == 1, op, ": v must be contiguous in the head dim");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong, op, ": slot_mapping must be int64, got ",
              slot_mapping.scalar_type());
  check_tensor(slot_mapping, "slot_mapping", device, at::kLong, {T});

  AppendProblem P;
  P.num_tokens = T;
  P.num_kv_heads = Hkv;
  P.head_dim = D;
  P.num_slots = k_cache.size(0) * k_cache.size(1);
  P.k = ptr<const void>(k);
  P.v = ptr<const void>(v);
  P.k_stride_t = k.stride(0);
  P.k_stride_h = k.stride(1);
  P.v_stride_t = v.stride(0);
  P.v_stride_h = v.stride(1);
  P.k_cache = ptr<void>(k_cache);
  P.v_cache = ptr<void>(v_cache);
  P.elem_bytes = k_cache.element_size();
  P.slot_mapping = ptr<const int64_t>(slot_mapping);
  return P;
}

void check_append_slots(const AppendProblem& P) {
  for (index_t t = 0; t < P.num_tokens; ++t) {
    const int64_t s = P.slot_mapping[t];
    TORCH_CHECK_VALUE(s >= -1 && s < P.num_slots, "append_kv: slot_mapping[", t, "] = ", s,
                " is outside [-1, num_pages * page_size = ", P.num_slots, ") (-1 skips the token)");
  }
}

void check_rollback_args(const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                         const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& block_start,
                         const std::optional<at::Tensor>& accept_index, const at::Tensor& num_accepted,
                         RollbackArgs* args) {
  constexpr const char* op = "kv_rollback";
  TORCH_CHECK(!k_caches.empty(), op, ": k_caches must hold at least one cache");
  TORCH_CHECK(page_table.dim() == 2, op, ": page_table must be [B, max_pages], got ", page_table.sizes());
  const auto device = page_table.device();
  const at::Tensor& first = k_caches[0];
  const auto one_layer = first.dim() == 5 ? first.sizes().slice(1) : first.sizes();
  TORCH_CHECK(one_layer.size() == 4, op, ": k_caches entries must be [num_pages, page_size, num_kv_heads, head_dim] "
              "or stacked [num_layers, num_pages, page_size, num_kv_heads, head_dim], got ", first.sizes());
  // Every layer of every list entry, as [num_pages, page_size, Hkv, D] base pointers.
  auto collect = [&](const std::vector<at::Tensor>& caches, const char* name, std::vector<char*>* layers) {
    for (size_t i = 0; i < caches.size(); ++i) {
      const at::Tensor& c = caches[i];
      TORCH_CHECK(c.device() == device, op, ": ", name, "[", i, "] is on ", c.device(), " but page_table is on ", device);
      TORCH_CHECK(c.scalar_type() == first.scalar_type(), op, ": ", name, "[", i, "] has dtype ", c.scalar_type(),
                  " but k_caches[0] has ", first.scalar_type());
      TORCH_CHECK(c.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
      const bool stacked = c.dim() == 5;
      TORCH_CHECK((stacked ? c.sizes().slice(1) : c.sizes()).equals(one_layer), op, ": ", name, "[", i,
                  "] must hold layers of shape ", one_layer, ", got ", c.sizes());
      const int64_t n = stacked ? c.size(0) : 1;
      const int64_t layer_bytes = c.numel() / std::max<int64_t>(n, 1) * c.element_size();
      for (int64_t l = 0; l < n; ++l) layers->push_back(c.is_meta() ? nullptr : static_cast<char*>(c.data_ptr()) + l * layer_bytes);
    }
  };
  args->k_layers.clear();
  args->v_layers.clear();
  collect(k_caches, "k_caches", &args->k_layers);
  collect(v_caches, "v_caches", &args->v_layers);
  TORCH_CHECK(args->k_layers.size() == args->v_layers.size(), op, ": k_caches hold ", args->k_layers.size(),
              " layers but v_caches hold ", args->v_layers.size());
  const int64_t B = page_table.size(0);
  check_index(page_table, op, "page_table", device, {B, page_table.size(1)});
  check_index(seq_lens, op, "seq_lens", device, {B});
  check_index(block_start, op, "block_start", device, {B});
  check_index(num_accepted, op, "num_accepted", device, {B});
  RollbackProblem& P = args->problem;
  P.kv.batch = B;
  P.kv.max_pages = page_table.size(1);
  P.kv.num_pages = one_layer[0];
  P.kv.page_size = one_layer[1];
  P.kv.num_kv_heads = one_layer[2];
  P.kv.head_dim = one_layer[3];
  P.kv.page_table = ptr<const int32_t>(page_table);
  P.num_layers = static_cast<index_t>(args->k_layers.size());
  P.elem_bytes = first.element_size();
  P.k_layers = args->k_layers.data();
  P.v_layers = args->v_layers.data();
  if (accept_index.has_value()) {
    TORCH_CHECK(accept_index->dim() == 2 && accept_index->size(0) == B, op, ": accept_index must be [B, M] with B = ",
                B, ", got ", accept_index->sizes());
    check_index(*accept_index, op, "accept_index", device, {B, accept_index->size(1)});
    P.max_block = accept_index->size(1);
    P.accept_index = ptr<const int32_t>(*accept_index);
  } else {
    P.max_block = 0;
    P.accept_index = nullptr;
  }
  P.block_start = ptr<const int32_t>(block_start);
  P.num_accepted = ptr<const int32_t>(num_accepted);
  P.seq_lens = ptr<int32_t>(seq_lens);
}

void check_rollback_metadata(const RollbackProblem& P, const int32_t* seq_lens) {
  constexpr const char* op = "kv_rollback";
  const PagedLayout& kv = P.kv;
  for (index_t b = 0; b < kv.batch; ++b) {
    const index_t len = seq_lens[b], start = P.block_start[b], n = P.num_accepted[b];
    TORCH_CHECK_VALUE(len >= 0 && len <= kv.capacity(), op, ": seq_lens[", b, "] = ", len, " is outside [0, page_table capacity ",
                kv.capacity(), "]");
    TORCH_CHECK_VALUE(start >= 0 && start <= len, op, ": block_start[", b, "] = ", start, " is outside [0, seq_lens[", b,
                "] = ", len, "]");
    TORCH_CHECK_VALUE(n >= 0 && start + n <= len, op, ": num_accepted[", b, "] = ", n, " must be in [0, seq_lens[", b,
                "] - block_start[", b, "] = ", len - start, "]");
    if (P.accept_index != nullptr) {
      TORCH_CHECK_VALUE(n <= P.max_block, op, ": num_accepted[", b, "] = ", n, " exceeds accept_index's width ", P.max_block);
      index_t prev = -1;
      for (index_t i = 0; i < n; ++i) {
        const index_t a = P.accept_index[b * P.max_block + i];
        TORCH_CHECK_VALUE(a > prev, op, ": accept_index[", b, "] must be strictly increasing and >= 0 in its first "
                    "num_accepted entries; entry ", i, " is ", a);
        TORCH_CHECK_VALUE(start + a < len, op, ": accept_index[", b, ", ", i, "] = ", a, " points past seq_lens[", b,
                    "] = ", len, " (block_start ", start, ")");
        prev = a;
      }
    }
    for (index_t p = 0; p * kv.page_size < len; ++p) {
      const int32_t page = kv.page_table[b * kv.max_pages + p];
      TORCH_CHECK_VALUE(kv.page_ok(page), op, ": page_table[", b, ", ", p, "] = ", page, " is outside [0, num_pages = ",
                  kv.num_pages, ")");
    }
  }
}

namespace {

// ---- draft_block_attention -------------------------------------------------

at::Tensor block_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& cu_q_lens,
                               bool causal, std::optional<double> scale, int64_t max_block_rows) {
  at::Tensor out;
  const BlockAttentionProblem P = check_block_attention_args(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens,
                                                             causal, scale, max_block_rows, &out);
  check_block_attention_metadata(P);
  const index_t B = P.kv.batch, Hkv = P.kv.num_kv_heads, G = P.group(), D = P.kv.head_dim;
  // Work items (request, kv head, row chunk, KV split), with the offset of their partial state when
  // the chunk has several splits (-1: the item writes the output itself).
  struct Item {
    index_t b, h, chunk, split, partial;
  };
  std::vector<Item> items;
  std::vector<Item> combines;  // (b, h, chunk, first partial) of the multi-split chunks
  index_t partial_floats = 0;
  for (index_t b = 0; b < B; ++b) {
    for (index_t c = 0; c < paged_cpu_chunks(P.block_rows(b)); ++c) {
      const PagedCpuChunk C = paged_cpu_chunk(P, b, c);
      const index_t stride = PagedCpuPartial::floats(C.rows * G, D);
      for (index_t h = 0; h < Hkv; ++h) {
        if (C.splits > 1) combines.push_back({b, h, c, 0, partial_floats});
        for (index_t s = 0; s < C.splits; ++s) {
          items.push_back({b, h, c, s, C.splits > 1 ? partial_floats : -1});
          if (C.splits > 1) partial_floats += stride;
        }
      }
    }
  }
  if (items.empty()) return out;
  std::unique_ptr<float[]> partials(partial_floats > 0 ? new float[partial_floats] : nullptr);
  auto* item_fn = DSPARK_ISA_DISPATCH(block_attention_item);
  // Items differ in cost (ragged blocks and lengths): workers pull them from a shared counter.
  const int64_t count = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    std::vector<float> scratch(static_cast<size_t>(PagedCpuScratch::floats(G, D)));
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) {
      const Item& it = items[i];
      item_fn(P, it.b, it.h, it.chunk, it.split, scratch.data(),
              it.partial >= 0 ? partials.get() + it.partial : nullptr);
    }
  });
  if (!combines.empty()) {
    auto* combine_fn = DSPARK_ISA_DISPATCH(block_attention_combine);
    at::parallel_for(0, static_cast<int64_t>(combines.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i)
        combine_fn(P, combines[i].b, combines[i].h, combines[i].chunk, partials.get() + combines[i].partial);
    });
  }
  return out;
}

at::Tensor block_attention_meta(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& cu_q_lens,
                                bool causal, std::optional<double> scale, int64_t max_block_rows) {
  at::Tensor out;
  check_block_attention_args(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, causal, scale, max_block_rows,
                             &out);
  return out;
}

void check_block_attention_op(const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& cu_q_lens,
                              int64_t num_tokens, int64_t num_pages, int64_t page_size, int64_t max_block_rows) {
  constexpr const char* op = "draft_block_attention";
  const c10::Device cpu(c10::kCPU);
  TORCH_CHECK(page_table.dim() == 2, op, ": page_table must be [B, max_pages], got ", page_table.sizes());
  const int64_t B = page_table.size(0);
  check_index(page_table, op, "page_table", cpu, {B, page_table.size(1)});
  check_index(seq_lens, op, "seq_lens", cpu, {B});
  check_index(cu_q_lens, op, "cu_q_lens", cpu, {B + 1});
  BlockAttentionProblem P;
  P.kv.batch = B;
  P.kv.max_pages = page_table.size(1);
  P.kv.num_pages = num_pages;
  P.kv.page_size = page_size;
  P.kv.page_table = page_table.data_ptr<int32_t>();
  P.num_tokens = num_tokens;
  P.max_block_rows = max_block_rows;
  P.seq_lens = seq_lens.data_ptr<int32_t>();
  P.cu_q_lens = cu_q_lens.data_ptr<int32_t>();
  check_block_attention_metadata(P);
}

#if defined(DSPARK_WITH_CUDA)
at::Tensor block_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& cu_q_lens,
                                bool causal, std::optional<double> scale, int64_t max_block_rows) {
  const c10::cuda::CUDAGuard guard(q.device());  // the tensors' device, its stream and its properties
  at::Tensor out;
  const BlockAttentionProblem P = check_block_attention_args(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens,
                                                             causal, scale, max_block_rows, &out);
  // Index values are checked in the kernel (a bad request's rows become NaN): raising would need a host sync.
  if (P.kv.batch == 0) return out.fill_(std::numeric_limits<double>::quiet_NaN());  // T rows, no request
  block_attention_cuda_launch(P, q);
  return out;
}
#endif

// ---- append_kv -------------------------------------------------------------

void append_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& slot_mapping) {
  const AppendProblem P = check_append_args(k, v, k_cache, v_cache, slot_mapping);
  check_append_slots(P);
  auto* run = DSPARK_ISA_DISPATCH(append_tokens);
  at::parallel_for(0, P.num_tokens, 16, [&](int64_t begin, int64_t end) { run(P, begin, end); });
}

void append_kv_meta(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  check_append_args(k, v, k_cache, v_cache, slot_mapping);
}

void check_append_op(const at::Tensor& slot_mapping, int64_t num_slots) {
  TORCH_CHECK(slot_mapping.dim() == 1, "append_kv: slot_mapping must be [T], got ", slot_mapping.sizes());
  check_tensor(slot_mapping, "slot_mapping", c10::Device(c10::kCPU), at::kLong, {slot_mapping.size(0)});
  AppendProblem P;
  P.num_tokens = slot_mapping.size(0);
  P.num_slots = num_slots;
  P.slot_mapping = slot_mapping.data_ptr<int64_t>();
  check_append_slots(P);
}

#if defined(DSPARK_WITH_CUDA)
void append_kv_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  const c10::cuda::CUDAGuard guard(k_cache.device());
  // Slots outside [0, num_slots) are skipped in the kernel (check=True in python raises instead).
  append_kv_cuda_launch(check_append_args(k, v, k_cache, v_cache, slot_mapping));
}
#endif

// ---- kv_rollback -----------------------------------------------------------

void kv_rollback_cpu(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& page_table,
                     const at::Tensor& seq_lens, const at::Tensor& block_start,
                     const std::optional<at::Tensor>& accept_index, const at::Tensor& num_accepted) {
  RollbackArgs args;
  check_rollback_args(k_caches.vec(), v_caches.vec(), page_table, seq_lens, block_start, accept_index, num_accepted,
                      &args);
  const RollbackProblem& P = args.problem;
  check_rollback_metadata(P, P.seq_lens);
  auto* run = DSPARK_ISA_DISPATCH(rollback_request_layer);
  const int64_t items = P.kv.batch * P.num_layers;
  if (P.accept_index != nullptr)
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t it = begin; it < end; ++it) run(P, it / P.num_layers, it % P.num_layers);
    });
  for (index_t b = 0; b < P.kv.batch; ++b) P.seq_lens[b] = P.block_start[b] + P.num_accepted[b];
}

void kv_rollback_meta(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& page_table,
                      const at::Tensor& seq_lens, const at::Tensor& block_start,
                      const std::optional<at::Tensor>& accept_index, const at::Tensor& num_accepted) {
  RollbackArgs args;
  check_rollback_args(k_caches.vec(), v_caches.vec(), page_table, seq_lens, block_start, accept_index, num_accepted,
                      &args);
}

void check_rollback_op(const at::Tensor& page_table, const at::Tensor& seq_lens, const at::Tensor& block_start,
                       const std::optional<at::Tensor>& accept_index, const at::Tensor& num_accepted,
                       int64_t num_pages, int64_t page_size) {
  constexpr const char* op = "kv_rollback";
  const c10::Device cpu(c10::kCPU);
  TORCH_CHECK(page_table.dim() == 2, op, ": page_table must be [B, max_pages], got ", page_table.sizes());
  const int64_t B = page_table.size(0);
  check_index(page_table, op, "page_table", cpu, {B, page_table.size(1)});
  check_index(seq_lens, op, "seq_lens", cpu, {B});
  check_index(block_start, op, "block_start", cpu, {B});
  check_index(num_accepted, op, "num_accepted", cpu, {B});
  RollbackProblem P;
  P.kv.batch = B;
  P.kv.max_pages = page_table.size(1);
  P.kv.num_pages = num_pages;
  P.kv.page_size = page_size;
  P.kv.page_table = page_table.data_ptr<int32_t>();
  if (accept_index.has_value()) {
    TORCH_CHECK(accept_index->dim() == 2 && accept_index->size(0) == B, op, ": accept_index must be [B, M] with B = ",
                B, ", got ", accept_index->sizes());
    check_index(*accept_index, op, "accept_index", cpu, {B, accept_index->size(1)});
    P.max_block = accept_index->size(1);
    P.accept_index = accept_index->data_ptr<int32_t>();
  }
  P.block_start = block_start.data_ptr<int32_t>();
  P.num_accepted = num_accepted.data_ptr<int32_t>();
  check_rollback_metadata(P, seq_lens.data_ptr<int32_t>());
}

#if defined(DSPARK_WITH_CUDA)
void kv_rollback_cuda(at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& page_table,
                      const at::Tensor& seq_lens, const at::Tensor& block_start,
                      const std::optional<at::Tensor>& accept_index, const at::Tensor& num_accepted) {
  const c10::cuda::CUDAGuard guard(page_table.device());
  RollbackArgs args;
  check_rollback_args(k_caches.vec(), v_caches.vec(), page_table, seq_lens, block_start, accept_index, num_accepted,
                      &args);
  // An invalid request (see RollbackProblem::request_ok) is left untouched, lengths included.
  kv_rollback_cuda_launch(args.problem);
}
#endif

}  // namespace
}  // namespace dspark

TORCH_LIBRARY_FRAGMENT(dspark, m) {
  m.def("append_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def(
      "draft_block_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor seq_lens, "
      "Tensor cu_q_lens, bool causal=True, float? scale=None, int max_block_rows=16) -> Tensor");
  m.def(
      "kv_rollback(Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor page_table, Tensor(c!) seq_lens, "
      "Tensor block_start, Tensor? accept_index, Tensor num_accepted) -> ()");
  m.def("_check_append_kv(Tensor slot_mapping, int num_slots) -> ()");
  m.def(
      "_check_draft_block_attention(Tensor page_table, Tensor seq_lens, Tensor cu_q_lens, int num_tokens, "
      "int num_pages, int page_size, int max_block_rows) -> ()");
  m.def(
      "_check_kv_rollback(Tensor page_table, Tensor seq_lens, Tensor block_start, Tensor? accept_index, "
      "Tensor num_accepted, int num_pages, int page_size) -> ()");
}
TORCH_LIBRARY_IMPL(dspark, CPU, m) {
  m.impl("append_kv", &dspark::append_kv_cpu);
  m.impl("draft_block_attention", &dspark::block_attention_cpu);
  m.impl("kv_rollback", &dspark::kv_rollback_cpu);
  m.impl("_check_append_kv", &dspark::check_append_op);
  m.impl("_check_draft_block_attention", &dspark::check_block_attention_op);
  m.impl("_check_kv_rollback", &dspark::check_rollback_op);
}
TORCH_LIBRARY_IMPL(dspark, Meta, m) {
  m.impl("append_kv", &dspark::append_kv_meta);
  m.impl("draft_block_attention", &dspark::block_attention_meta);
  m.impl("kv_rollback", &dspark::kv_rollback_meta);
}
#if defined(DSPARK_WITH_CUDA)
TORCH_LIBRARY_IMPL(dspark, CUDA, m) {
  m.impl("append_kv", &dspark::append_kv_cuda);
  m.impl("draft_block_attention", &dspark::block_attention_cuda);
  m.impl("kv_rollback", &dspark::kv_rollback_cuda);
}
#endif
