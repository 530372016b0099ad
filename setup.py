"""Builds the KV-cache extension `toyllm.engine.ops._C` (engine/ops/_C*.so) against the installed torch.

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


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


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
# at::parallel_for (csrc/cpu_gemv.cpp) is an OpenMP loop compiled into the module: without
# -fopenmp it runs on one thread. The module then needs libgomp.so.1, which torch has loaded.
link_flags: list[str] = []
if sys.platform.startswith("linux"):
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
# every source compiles to build/<stem>.o: two files with one stem (x.cpp, x.cu) would collide
_stems = [os.path.splitext(p)[0] for p in _sources("*.cpp") + _sources("*.cu")]
if len(_stems) != len(set(_stems)):
    raise SystemExit(f"csrc/: two sources share a name: {sorted(_stems)}")

if _with_cuda():
    ext = CUDAExtension(
        name="toyllm.engine.ops._C",
        sources=_sources("*.cpp") + _sources("*.cu"),
        define_macros=[("TOYLLM_WITH_CUDA", "1")],
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
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )

setup(ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
