// The `dspark` operator library. Op families add their schemas with
// TORCH_LIBRARY_FRAGMENT in csrc/bindings/<family>.cpp; this file owns the
// library itself, build information and the Python module entry point.
#include <Python.h>
#include <torch/library.h>

#include <string>

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
  s += "true}";
#else
  s += "false}";
#endif
  return s;
}

}  // namespace

TORCH_LIBRARY(dspark, m) {
  m.def("build_info() -> str", &build_info);
}

// Importing dspark_ops._C runs the static registrations above; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "dspark_ops kernels (see torch.ops.dspark)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
