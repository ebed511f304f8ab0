"""Builds the C++ packing core as ``soulchat._packer``.

Everything else lives in pyproject.toml. The extension needs only a C++17 compiler and pybind11's
headers at build time: no torch, no CUDA.
"""

import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

extra_compile_args = ["/O2"] if sys.platform == "win32" else ["-O3"]

setup(
    ext_modules=[
        Pybind11Extension(
            "soulchat._packer",
            ["csrc/packer.cpp"],
            cxx_std=17,
            extra_compile_args=extra_compile_args,
        )
    ],
    cmdclass={"build_ext": build_ext},
)
