"""Build of the native CPU extension (`tmem_kernels._native`).

Pure pybind11 (no torch headers): tensors cross the boundary as data pointers, so the build needs
only a C++ compiler, setuptools and pybind11, and works under pip's build isolation without torch.
"""

import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

compile_args = ["-O3", "-ffast-math", "-fno-finite-math-only"]
link_args = []
if sys.platform.startswith("linux"):
    compile_args += ["-fopenmp", "-march=" + os.environ.get("TMEM_MARCH", "native")]
    link_args += ["-fopenmp"]

setup(
    ext_modules=[
        Pybind11Extension(
            "tmem_kernels._native",
            sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
