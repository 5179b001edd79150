"""Build of the native CPU extension (`tmem_kernels._native`).

Pure pybind11 (no torch headers): tensors cross the boundary as data pointers, so the build needs
only a C++ compiler, setuptools and pybind11, and works under pip's build isolation without torch.

The extension is optional: where it cannot be built (no pybind11 under --no-build-isolation, no
compiler, a failed compile) the package installs without it and the "native" backend reports itself
unavailable; the Triton and torch backends do not need it (a GPU machine runs Triton).
"""

import os
import sys

from setuptools import setup


def native_extensions() -> dict:
    """setup() arguments for the native extension; none where pybind11 is missing."""
    try:
        from pybind11.setup_helpers import Pybind11Extension, build_ext
    except ImportError:  # e.g. `pip install -e . --no-build-isolation` where pybind11 is not installed
        print("tmem: pybind11 not found, installing without the native CPU extension", file=sys.stderr)
        return {}
    compile_args = ["-O3", "-ffast-math", "-fno-finite-math-only"]
    link_args = []
    if sys.platform.startswith("linux"):
        compile_args += ["-fopenmp", "-march=" + os.environ.get("TMEM_MARCH", "native")]
        link_args += ["-fopenmp"]
    ext = Pybind11Extension(
        "tmem_kernels._native",
        sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
        cxx_std=17,
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        optional=True,  # a failed build installs the package without it
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build_ext}}


setup(**native_extensions())
