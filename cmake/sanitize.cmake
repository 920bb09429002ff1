# PYKERNELS_SANITIZE=address,undefined: the C++ engines instrumented with AddressSanitizer and/or
# UndefinedBehaviorSanitizer, for tests (./run.sh sanitize builds one into build/sanitize; README: "Sanitizers").
# The module is loaded into an uninstrumented Python, so the run needs libasan preloaded; torch is not instrumented,
# but its CPU tensors are allocated through the intercepted malloc, so a read past a tensor's storage is caught.
set(PK_SANITIZERS "")
set(PK_MODULE_EXTRAS "")
if(PYKERNELS_SANITIZE)
  string(REPLACE "," ";" PK_SANITIZERS "${PYKERNELS_SANITIZE}")
  foreach(_san IN LISTS PK_SANITIZERS)
    # thread is left out on purpose: the emulation module defines the __tsan_* entry points itself, and the TSan
    # runtime would take them over.
    if(NOT _san MATCHES "^(address|undefined)$")
      message(FATAL_ERROR "PYKERNELS_SANITIZE=${PYKERNELS_SANITIZE}: '${_san}' is not supported; "
                          "expected a comma-separated list of address, undefined")
    endif()
  endforeach()
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    message(FATAL_ERROR "PYKERNELS_SANITIZE needs GCC or Clang, not ${CMAKE_CXX_COMPILER_ID}")
  endif()
  # No LTO and no strip from pybind11: LTO would move code generation to the link, and stripping drops the symbols
  # and lines the reports are written with.
  set(PK_MODULE_EXTRAS NO_EXTRAS)
  message(STATUS "pykernels: sanitizers ${PYKERNELS_SANITIZE} (the C++ engines at -O1 -g1; load them with libasan "
                 "preloaded, as ./run.sh sanitize does)")
endif()

# Instruments a module's C++ sources, except the files named after TSAN_UNITS, the emulated kernels (see
# cmake/cuda_emulation.cmake), whose ThreadSanitizer instrumentation GCC cannot combine with AddressSanitizer's:
# they get UBSan only, and their memory accesses stay the emulator's to check. The files after UNINSTRUMENTED get
# no sanitizer: the emulator's runtime defines the __tsan_* entry points, which any -fsanitize declares as
# builtins with other signatures.
function(pk_sanitize target)
  cmake_parse_arguments(PARSE_ARGV 1 _arg "" "" "TSAN_UNITS;UNINSTRUMENTED")
  if(NOT PK_SANITIZERS)
    return()
  endif()
  list(JOIN PK_SANITIZERS "," _list)
  # -O1 after the target's -O3: ASan's usual level (fast enough for the test suite, and frames stay readable);
  # -g1: line tables, all a report's file:line needs, at less compile time than full debug info;
  # -fno-sanitize-recover: the first UB report ends the process, so a test run cannot pass over one.
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${_list} -fno-sanitize-recover=all
                         -fno-omit-frame-pointer -g1 -O1>)
  target_link_options(${target} PRIVATE -fsanitize=${_list})
  if(_arg_TSAN_UNITS AND "address" IN_LIST PK_SANITIZERS)
    set_property(SOURCE ${_arg_TSAN_UNITS} APPEND PROPERTY COMPILE_OPTIONS -fno-sanitize=address)
  endif()
  if(_arg_UNINSTRUMENTED)
    set_property(SOURCE ${_arg_UNINSTRUMENTED} APPEND PROPERTY COMPILE_OPTIONS -fno-sanitize=all)
  endif()
endfunction()
