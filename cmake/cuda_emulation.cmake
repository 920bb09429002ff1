# PYKERNELS_CUDA_EMULATE: a second extension module, pykernels/_cuda_emulated, in which the CUDA engine's kernel
# files and launchers run on CPU tensors in the emulator of csrc/emulation (pykernels_cuda_emulated::<op>, CPU key).
# It is a separate module, whether or not _C holds the real CUDA engine, because both compile the same launchers
# and kernel templates; its symbols stay hidden. See the top of csrc/emulation/cuda_emulation.h for the build rules.
file(GLOB_RECURSE _emu_kernel_files CONFIGURE_DEPENDS csrc/*_kernel.cu)
file(GLOB_RECURSE _emu_launchers CONFIGURE_DEPENDS csrc/*_cuda.cpp)

# The .cu files are CUDA sources of _C when the real engine is built, and a source's language is per directory,
# so each one is compiled here through a C++ file that includes it after the emulation header (what -include
# does in the hand-written build).
set(_emu_kernel_units "")
foreach(_kernel IN LISTS _emu_kernel_files)
  file(RELATIVE_PATH _rel "${CMAKE_CURRENT_SOURCE_DIR}/csrc" "${_kernel}")
  string(REPLACE "/" "__" _unit "${_rel}")
  set(_unit "${CMAKE_CURRENT_BINARY_DIR}/cuda_emulated/${_unit}.cpp")
  file(CONFIGURE OUTPUT "${_unit}" CONTENT "#include \"emulation/cuda_emulation.h\"\n#include \"${_kernel}\"\n")
  list(APPEND _emu_kernel_units "${_unit}")
endforeach()
# Instrumentation only: the emulator defines the __tsan_* entry points it calls, so neither the link nor the
# runtime file may pull in the real TSan runtime. -O1 keeps each access an instrumented load or store.
set_source_files_properties(${_emu_kernel_units} PROPERTIES COMPILE_OPTIONS
  "-O1;-g;-fsanitize=thread;--param=tsan-instrument-func-entry-exit=0")

# NO_EXTRAS: no LTO, which would move the instrumented code generation to a link without -fsanitize=thread and let
# the uninstrumented runtime inline into kernels, and no strip: the emulator names kernels from the symbol table
# and finds file:line with addr2line in the debug info.
pybind11_add_module(_cuda_emulated MODULE NO_EXTRAS csrc/emulation/cuda_emulation.cpp
                    csrc/emulation/emulated_module.cpp ${_emu_kernel_units} ${_emu_launchers})
# The stub cuda_runtime.h, cuda_fp16.h and cub/ headers come before anything else named so.
target_include_directories(_cuda_emulated BEFORE PRIVATE csrc/emulation/include)
target_include_directories(_cuda_emulated PRIVATE csrc csrc/emulation)
target_include_directories(_cuda_emulated SYSTEM PRIVATE ${PK_TORCH_INCLUDE_DIRS})
pk_torch_libraries(_emu_torch_libs c10 torch torch_cpu torch_python)
target_link_libraries(_cuda_emulated PRIVATE ${_emu_torch_libs})
target_link_libraries(_cuda_emulated PRIVATE ${CMAKE_DL_LIBS})
target_compile_definitions(_cuda_emulated PRIVATE _GLIBCXX_USE_CXX11_ABI=${PK_TORCH_CXX11_ABI} PK_CUDA_EMULATION=1
                           TORCH_EXTENSION_NAME=_cuda_emulated)
# -g for the file:line of the emulator's reports (addr2line); the launchers and runtime need no more than -O1.
target_compile_options(_cuda_emulated PRIVATE -O1 -g -Wall -Wno-unused-function)
# As a file, not a target: scikit-build-core installs targets with --strip.
install(PROGRAMS $<TARGET_FILE:_cuda_emulated> DESTINATION pykernels)
message(STATUS "pykernels: emulated CUDA engine on (pykernels/_cuda_emulated)")
