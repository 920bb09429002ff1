"""Write what the build needs to know about the installed torch as a CMake script (argv[1]).

CMakeLists.txt uses this instead of find_package(Torch): the CMake config of a CUDA build of torch insists
on a complete CUDA toolkit (nvrtc included) even for a CPU-only extension, and adds its own -gencode list,
which newer nvcc rejects. torch's own extension builder (torch.utils.cpp_extension) does not use it either.
Everything here is read from the torch that the building interpreter imports, so the extension links the
torch it will run with.
"""
from __future__ import annotations

import glob
import os
import sys


def cmake_string(value: str) -> str:
    return '"' + value.replace("\\", "/").replace('"', '\\"') + '"'


def cmake_list(values: list[str]) -> str:
    return cmake_string(";".join(values))


def nvidia_wheel_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of the nvidia-* wheels a pip-installed CUDA torch depends on.

    CUDA 13 wheels lay everything out under nvidia/cu13/; CUDA 12 wheels use one folder per library
    (nvidia/cuda_runtime/, nvidia/cuda_nvrtc/, ...). Both are searched.
    """
    try:
        import nvidia
    except ImportError:
        return [], []
    includes, libs = [], []
    for root in nvidia.__path__:
        for sub in sorted(glob.glob(os.path.join(root, "*"))):
            if os.path.isfile(os.path.join(sub, "include", "cuda_runtime.h")):
                includes.append(os.path.join(sub, "include"))
            if glob.glob(os.path.join(sub, "lib", "libcudart.so*")):
                libs.append(os.path.join(sub, "lib"))
    return includes, libs


def main() -> None:
    import torch

    torch_dir = os.path.dirname(torch.__file__)
    includes, libs = nvidia_wheel_dirs() if torch.version.cuda else ([], [])
    values = {
        "PK_TORCH_VERSION": cmake_string(torch.__version__),
        "PK_TORCH_CUDA_VERSION": cmake_string(torch.version.cuda or ""),
        "PK_TORCH_CXX11_ABI": str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        "PK_TORCH_INCLUDE_DIRS": cmake_list(
            [os.path.join(torch_dir, "include"), os.path.join(torch_dir, "include", "torch", "csrc", "api", "include")]
        ),
        "PK_TORCH_LIB_DIR": cmake_string(os.path.join(torch_dir, "lib")),
        "PK_TORCH_WHEEL_CUDA_INCLUDE_DIRS": cmake_list(includes),
        "PK_TORCH_WHEEL_CUDA_LIB_DIRS": cmake_list(libs),
    }
    with open(sys.argv[1], "w") as out:
        for name, value in values.items():
            out.write(f"set({name} {value})\n")


if __name__ == "__main__":
    main()
