"""Builds the C++ CPU extension `qruntime._C` (pybind11, no torch headers)."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "qruntime._C",
        sources=["csrc/dequant.cpp", "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        # -O3 without -march: the wheel must run on any x86-64/arm64 CPU; ISA-specific objects with
        # run-time dispatch come with the CPU-fallback kernels.
        extra_compile_args=["-O3"],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
