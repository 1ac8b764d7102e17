# Locates the installed torch by asking Python (no find_package(Torch): its CUDA
# probing needs hints that differ between torch builds; see BUILD_NOTES.md).
execute_process(
  COMMAND ${Python_EXECUTABLE} -c
  "import os, torch; d=os.path.dirname(torch.__file__); print(d); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.version.cuda or ''); print(os.path.dirname(d))"
  OUTPUT_VARIABLE _dspark_torch_info OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _dspark_torch_rc)
if(NOT _dspark_torch_rc EQUAL 0)
  message(FATAL_ERROR "dspark_ops needs torch installed in ${Python_EXECUTABLE} (build with --no-build-isolation)")
endif()
string(REPLACE "\n" ";" _dspark_torch_info "${_dspark_torch_info}")
list(GET _dspark_torch_info 0 DSPARK_TORCH_DIR)
list(GET _dspark_torch_info 1 DSPARK_TORCH_CXX11_ABI)
list(GET _dspark_torch_info 2 DSPARK_TORCH_CUDA)
list(GET _dspark_torch_info 3 DSPARK_SITE_PACKAGES)

set(DSPARK_TORCH_INCLUDE_DIRS ${DSPARK_TORCH_DIR}/include
    ${DSPARK_TORCH_DIR}/include/torch/csrc/api/include)
set(DSPARK_TORCH_LIBRARY_DIR ${DSPARK_TORCH_DIR}/lib)
set(DSPARK_TORCH_DEFINITIONS _GLIBCXX_USE_CXX11_ABI=${DSPARK_TORCH_CXX11_ABI}
    TORCH_EXTENSION_NAME=_C TORCH_API_INCLUDE_EXTENSION_H)
set(DSPARK_TORCH_LIBRARIES c10 torch_cpu torch)
# The CUDA wheels (installed beside torch, which may live in another venv) put the toolkit headers that ATen/cuda includes (cuBLAS, cuSPARSE) here.
file(GLOB DSPARK_TORCH_CUDA_INCLUDE_DIRS ${DSPARK_SITE_PACKAGES}/nvidia/cu*/include)
set(DSPARK_TORCH_CUDA_LIBRARIES c10_cuda torch_cuda)

# OpenMP: at::parallel_for is header code, so an extension compiled without
# OpenMP runs every parallel region on one thread, silently. Compile with
# -fopenmp and link the runtime torch itself loads (torch/lib/libgomp.so.1 in
# the Linux wheels; same soname as the system's): one thread pool, governed by
# torch.set_num_threads. Elsewhere, CMake's OpenMP.
file(GLOB DSPARK_TORCH_OPENMP_LIBRARY ${DSPARK_TORCH_DIR}/lib/libgomp.so*)
if(DSPARK_TORCH_OPENMP_LIBRARY)
  list(GET DSPARK_TORCH_OPENMP_LIBRARY 0 DSPARK_TORCH_OPENMP_LIBRARY)
  set(DSPARK_OPENMP_COMPILE_FLAGS -fopenmp)
  set(DSPARK_OPENMP_LINK ${DSPARK_TORCH_OPENMP_LIBRARY})
else()
  find_package(OpenMP REQUIRED COMPONENTS CXX)
  set(DSPARK_OPENMP_COMPILE_FLAGS ${OpenMP_CXX_FLAGS})
  set(DSPARK_OPENMP_LINK OpenMP::OpenMP_CXX)
endif()
