# Compiles each CPU kernel source once per instruction set (generic, avx2,
# avx512). A source defines its functions inside `namespace DSPARK_ISA`, and
# csrc/include/dspark/cpu_isa.h picks the best one at run time.
# Kernel sources include only our own headers and the C/C++ standard library:
# torch headers compiled with -mavx512f would emit inline functions that the
# linker could pick for machines without AVX-512.
function(dspark_add_isa_objects target sources extra_flags)
  set(_isas generic avx2 avx512)
  set(_flags_generic "")
  set(_flags_avx2 -mavx2 -mfma -mf16c -mbmi2)
  set(_flags_avx512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c -mbmi2 -mprefer-vector-width=512)
  set(_objects "")
  foreach(isa IN LISTS _isas)
    add_library(${target}_${isa} OBJECT ${sources})
    target_include_directories(${target}_${isa} PRIVATE ${PROJECT_SOURCE_DIR}/csrc/include)
    target_compile_definitions(${target}_${isa} PRIVATE DSPARK_ISA=${isa})
    target_compile_options(${target}_${isa} PRIVATE -O3 -fno-math-errno -fno-trapping-math ${_flags_${isa}} ${extra_flags})
    list(APPEND _objects $<TARGET_OBJECTS:${target}_${isa}>)
  endforeach()
  set(${target}_OBJECTS ${_objects} PARENT_SCOPE)
endfunction()
