# Decides whether the CUDA engine is built. Sets _with_cuda and _cuda_reason (reported by pk.info()) and, when
# it is built, _cuda_include_dirs and _cudart. With PYKERNELS_CUDA=auto an incomplete CUDA setup falls back to
# the CPU engine and says why; with =on it stops the build with the same reason.
set(_with_cuda OFF)

macro(pk_without_cuda reason)
  if(PYKERNELS_CUDA STREQUAL "on")
    message(FATAL_ERROR "pykernels: PYKERNELS_CUDA=on, but ${reason}")
  endif()
  set(_cuda_reason "not built: ${reason}")
  return()
endmacro()

if(PYKERNELS_CUDA STREQUAL "off")
  set(_cuda_reason "not built: disabled by PYKERNELS_CUDA=off")
  return()
endif()
if(NOT PYKERNELS_CUDA MATCHES "^(auto|on)$")
  message(FATAL_ERROR "pykernels: PYKERNELS_CUDA must be auto, on or off, not '${PYKERNELS_CUDA}'")
endif()
if(PK_TORCH_CUDA_VERSION STREQUAL "")
  pk_without_cuda("the installed torch ${PK_TORCH_VERSION} is a CPU build")
endif()

# sm_80 code runs on every later GPU of the same major version (A10, RTX 30/40, L4, L40); sm_90 serves H100/H200;
# the PTX embedded with each lets the driver compile for newer majors. CUDAARCHS overrides it, as in any CMake project.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES AND NOT DEFINED ENV{CUDAARCHS})
  set(CMAKE_CUDA_ARCHITECTURES 80 90)
endif()
set(_archs "${CMAKE_CUDA_ARCHITECTURES}")
if(DEFINED ENV{CUDAARCHS} AND NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(_archs "$ENV{CUDAARCHS}")
endif()
foreach(_arch IN LISTS _archs)
  if(_arch MATCHES "^([0-9]+)" AND CMAKE_MATCH_1 LESS 80)
    message(FATAL_ERROR "pykernels: CUDA architecture ${_arch} is not supported: the attention engine's tensor-core "
                        "tiles (mma.sync.m16n8k16) need sm_80 or newer. Set CUDAARCHS to archs >= 80, e.g. \"80;90\", "
                        "or build without CUDA (PYKERNELS_CUDA=off).")
  endif()
endforeach()

include(CheckLanguage)
check_language(CUDA)
if(NOT CMAKE_CUDA_COMPILER)
  pk_without_cuda("no working CUDA compiler was found (put nvcc on PATH or set CUDACXX=/path/to/nvcc)")
endif()
enable_language(CUDA)
set(CMAKE_CUDA_STANDARD 17)
set(CMAKE_CUDA_STANDARD_REQUIRED ON)

# Kernels compiled by one CUDA major and registered with another's runtime are not supported, and linking a
# second runtime beside torch's would give the process two CUDA contexts' worth of state.
string(REGEX MATCH "^[0-9]+" _nvcc_major "${CMAKE_CUDA_COMPILER_VERSION}")
string(REGEX MATCH "^[0-9]+" _torch_cuda_major "${PK_TORCH_CUDA_VERSION}")
if(NOT _nvcc_major STREQUAL _torch_cuda_major)
  pk_without_cuda("nvcc ${CMAKE_CUDA_COMPILER} is CUDA ${CMAKE_CUDA_COMPILER_VERSION} while torch was built with "
                  "CUDA ${PK_TORCH_CUDA_VERSION}: point CUDACXX at an nvcc ${_torch_cuda_major}.x, or install the torch "
                  "build for your CUDA")
endif()

# The launchers include cuda_runtime.h: the toolkit's, else the copy in torch's nvidia-* wheels.
find_path(_cuda_runtime_include cuda_runtime.h
  PATHS ${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES} ${PK_TORCH_WHEEL_CUDA_INCLUDE_DIRS} NO_DEFAULT_PATH NO_CACHE)
if(NOT _cuda_runtime_include)
  pk_without_cuda("cuda_runtime.h is neither in the toolkit of ${CMAKE_CUDA_COMPILER} nor in torch's nvidia-* "
                  "wheels (${PK_TORCH_WHEEL_CUDA_INCLUDE_DIRS})")
endif()
set(_cuda_include_dirs "${_cuda_runtime_include}")

# Link the CUDA runtime torch itself loads (its nvidia-* wheel) so the process holds one runtime; a toolkit's
# shared runtime of the same major is the fallback. Never the static one.
find_library(_cudart NAMES libcudart.so.${_torch_cuda_major} cudart
  PATHS ${PK_TORCH_WHEEL_CUDA_LIB_DIRS} ${CMAKE_CUDA_IMPLICIT_LINK_DIRECTORIES} NO_DEFAULT_PATH NO_CACHE)
if(NOT _cudart)
  pk_without_cuda("no shared CUDA runtime (libcudart.so.${_torch_cuda_major}) in torch's nvidia-* wheels "
                  "(${PK_TORCH_WHEEL_CUDA_LIB_DIRS}) or in the toolkit (${CMAKE_CUDA_IMPLICIT_LINK_DIRECTORIES})")
endif()
set(CMAKE_CUDA_RUNTIME_LIBRARY None)

set(_with_cuda ON)
string(REPLACE ";" ", " _archs_text "${_archs}")
set(_cuda_reason "built for archs ${_archs_text} with nvcc ${CMAKE_CUDA_COMPILER_VERSION}, runtime ${_cudart}")
