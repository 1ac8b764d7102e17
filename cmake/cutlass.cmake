# CUTLASS/CuTe headers (header-only; the tensor-core attention kernel uses them).
# Looked up in this order: $DSPARK_CUTLASS_INCLUDE (a folder holding cute/ and
# cutlass/, e.g. a copy carried to a machine without internet), then the
# nvidia-cutlass wheel in the build's Python (scripts/setup.sh installs it).
# Sets DSPARK_CUTLASS_INCLUDE_DIR, empty when not found: the kernels that need
# CuTe are then left out and the SIMT kernels serve every case.
set(DSPARK_CUTLASS_INCLUDE_DIR "")
set(_dspark_cutlass_candidates "")
if(DEFINED ENV{DSPARK_CUTLASS_INCLUDE} AND NOT "$ENV{DSPARK_CUTLASS_INCLUDE}" STREQUAL "")
  list(APPEND _dspark_cutlass_candidates "$ENV{DSPARK_CUTLASS_INCLUDE}")
endif()
execute_process(
  COMMAND ${Python_EXECUTABLE} -c
  "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
  OUTPUT_VARIABLE _dspark_cutlass_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(_dspark_cutlass_wheel)
  list(APPEND _dspark_cutlass_candidates "${_dspark_cutlass_wheel}")
endif()
foreach(_dir IN LISTS _dspark_cutlass_candidates)
  if(EXISTS "${_dir}/cute/arch/mma_sm80.hpp" AND EXISTS "${_dir}/cutlass/cutlass.h")
    set(DSPARK_CUTLASS_INCLUDE_DIR "${_dir}")
    break()
  endif()
endforeach()
if(DSPARK_CUTLASS_INCLUDE_DIR)
  message(STATUS "dspark_ops: CUTLASS/CuTe headers at ${DSPARK_CUTLASS_INCLUDE_DIR}")
else()
  message(STATUS "dspark_ops: CUTLASS/CuTe headers not found (pip install nvidia-cutlass, or set "
                 "DSPARK_CUTLASS_INCLUDE): the tensor-core attention path is not built")
endif()
