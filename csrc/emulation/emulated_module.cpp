// pykernels._cuda_emulated: the CUDA engine's launchers and kernels compiled against the emulator (see
// cmake/cuda_emulation.cmake). Its ops are the CPU kernels of pykernels_cuda_emulated::<op>, registered by the
// launchers' static initialisers; the module itself only reports and sets what the emulator models.
#include <torch/extension.h>

#include "emulation/cuda_emulation.h"

PYBIND11_MODULE(_cuda_emulated, m) {
  m.doc() = "pykernels' CUDA engine on CPU tensors, in the CUDA emulator";
  m.def("arch", &pk::emu::arch, "The emulated architecture: 80 or 90 (initially PK_EMU_ARCH, default 90)");
  m.def("set_arch", &pk::emu::set_arch, "Emulate sm_80 or sm_90: their shared-memory limits");
  m.def("launch_counts", &pk::emu::launch_counts,
        "Launches so far per kernel, by mangled name: which of the engine's kernels the emulated runs reached");
}
