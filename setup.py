"""Builds the extension `toyllm.engine.ops._C` (engine/ops/_C*.so) against the installed torch.

The C++ part (host class, CPU kernel, operator registration, bindings) builds everywhere.
The CUDA part builds when the installed torch has CUDA and nvcc is present; set
TORCH_CUDA_ARCH_LIST (for instance "9.0") to choose the architectures, and
TOYLLM_NO_CUDA=1 to skip CUDA on purpose.
"""

import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


CSRC = os.path.join(ROOT, "csrc")


def _sources(pattern: str) -> list[str]:
    """csrc/**/<pattern>, relative to the repository root (csrc/gemv/gemv.cu, ...)."""
    found = glob.glob(os.path.join(CSRC, "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in found)


def _with_cuda() -> bool:
    if os.environ.get("TOYLLM_NO_CUDA") == "1":
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


# Compile and link with the system's gcc/g++ (the compilers Python and torch's ABI go with),
# linking with g++ so libstdc++ is in the module's NEEDED list. Seen on the GPU machine: its
# environment sets CXX to another toolchain (/opt/gcc), whose link left libstdc++ out; any C++
# exception raised through pybind11 then crashed the interpreter instead of becoming a Python
# error (scripts/gpu_check.sh smoke-tests exactly that). TOYLLM_KEEP_CC=1 keeps CC/CXX as set.
if sys.platform.startswith("linux") and os.environ.get("TOYLLM_KEEP_CC") != "1":
    os.environ.update(CC="gcc", CXX="g++", LDSHARED="g++ -shared", LDCXXSHARED="g++ -shared")

cxx_flags = ["-O3", "-std=c++17"]
# at::parallel_for (csrc/gemv/cpu_gemv.cpp) is an OpenMP loop compiled into the module: without
# -fopenmp it runs on one thread. The module then needs libgomp.so.1, which torch has loaded.
link_flags: list[str] = []
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
# Every source compiles to build/temp*/<its path without the extension>.o (csrc/gemv/gemv.cu ->
# csrc/gemv/gemv.o): the same name in two folders is fine, but x.cpp and x.cu in ONE folder
# would write one object file.
_stems = [os.path.splitext(p)[0] for p in _sources("*.cpp") + _sources("*.cu")]
_shared = sorted({s for s in _stems if _stems.count(s) > 1})
if _shared:
    raise SystemExit(f"csrc/: a .cpp and a .cu share a path and a name: {_shared}")
# Sources include each other by their path under csrc/ ("common/dtype_names.h").
include_dirs = [CSRC]

if _with_cuda():
    ext = CUDAExtension(
        name="toyllm.engine.ops._C",
        sources=_sources("*.cpp") + _sources("*.cu"),
        define_macros=[("WITH_CUDA_KERNELS", "1")],
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"],
        },
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        name="toyllm.engine.ops._C",
        sources=_sources("*.cpp"),
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
