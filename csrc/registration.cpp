// The `dspark` operator library. Op families add their schemas with
// TORCH_LIBRARY_FRAGMENT in csrc/bindings/<family>.cpp; this file owns the
// library itself, build information and the Python module entry point.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <chrono>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "dspark/cpu_isa.h"

namespace {

std::string build_info() {
  std::string archs = DSPARK_CUDA_ARCHS_STR;
  std::string s = "{\"version\": \"" DSPARK_VERSION_STR "\", \"cuda_archs\": \"" + archs +
                  "\", \"cpu_isa\": \"" + dspark::cpu::isa_name(dspark::cpu::best_isa()) +
                  "\", \"attention_tc\": ";
#if defined(DSPARK_WITH_CUTE)
  s += "true, \"sanitize\": ";
#else
  s += "false, \"sanitize\": ";
#endif
#if defined(__SANITIZE_ADDRESS__)
  s += "true, \"openmp\": ";
#else
  s += "false, \"openmp\": ";
#endif
#if defined(_OPENMP)
  s += "true}";
#else
  s += "false}";
#endif
  return s;
}

// How many OS threads run a parallel region of this library now: one item per
// torch intra-op thread through the same at::parallel_for the CPU kernels use,
// counting the distinct threads that ran an item. Built without OpenMP, the
// region runs serially and this is 1 whatever torch.get_num_threads() says.
int64_t parallel_threads() {
  std::mutex mutex;
  std::set<std::thread::id> seen;
  const int64_t items = at::get_num_threads();
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    // Hold each item briefly so that one thread cannot run every item before the others start.
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    std::lock_guard<std::mutex> lock(mutex);
    seen.insert(std::this_thread::get_id());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

TORCH_LIBRARY(dspark, m) {
  m.def("build_info() -> str", &build_info);
  m.def("parallel_threads() -> int", &parallel_threads);
}

// Importing dspark_ops._C runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dspark_ops kernels (see torch.ops.dspark)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
