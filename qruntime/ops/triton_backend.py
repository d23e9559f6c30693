"""The Triton backend: registers the kernels of ``qruntime.kernels`` as the ``cuda`` implementation of
each op in :mod:`qruntime.ops.registry`.

The kernels live in the repository's top-level ``kernels/`` folder, installed as the subpackage
``qruntime.kernels`` (a namespace package: the folder has no ``__init__.py``, so it can never shadow
another top-level ``kernels`` package, such as the one transformers imports, when Python runs from the
repository root). One file per kernel family, launcher beside its kernel:

* :mod:`qruntime.kernels.w8a16`: fp16/bf16 x INT8 per-channel weights;
* :mod:`qruntime.kernels.w4a16`: fp16/bf16 x INT4 weights, per-channel or group-wise, sym / asym;
* :mod:`qruntime.kernels.w8a8`: fused per-token activation quantization + int8 x int8 GEMM;
* :mod:`qruntime.kernels.sp24`: 2:4-sparse weights (float, INT8 or INT4 kept values) expanded in
  registers, and PyTorch's semi-structured sparse path at large M;
* :mod:`qruntime.kernels.dispatch`: the path (split-K / GEMM / dequantize + cuBLAS / semi-structured)
  chosen by M;
* :mod:`qruntime.kernels.aot`: ahead-of-time compile of every config for sm_80 / sm_90 (no GPU needed).

See docs/kernels.md.

Importing this module registers the launchers and does nothing else: Triton and the kernel modules are
imported on the first CUDA call (no CUDA query, no compilation at import). Without Triton, CUDA calls
run the PyTorch reference, with one warning.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

from . import registry as ops
from . import reference

FAMILIES = ("w8a16", "w4a16", "w8a8", "sp24")
KERNELS = "qruntime.kernels"  # the package of the kernel modules (the folder kernels/)


@functools.lru_cache(maxsize=None)
def load(family: str) -> ModuleType | None:
    """The kernel module of ``family``, or None (with one warning) when Triton cannot be imported."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    try:
        return importlib.import_module(f"{KERNELS}.{family}")
    except ImportError as exc:
        warnings.warn(
            f"qruntime: Triton kernels unavailable ({exc}); CUDA ops run the PyTorch reference "
            "(dequantize + matmul). Install triton (it ships with CUDA builds of torch).",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def _cuda(family: str, check, fallback):
    """The ``cuda`` implementation of ``<family>_linear``: the Triton launcher, or (without Triton) the
    op's checks and its PyTorch reference."""

    def impl(*args):
        module = load(family)
        if module is None:
            check(*args)
            return fallback(*args)
        return getattr(module, f"{family}_linear")(*args)

    impl.__name__ = f"cuda_{family}"
    return impl


cuda_w8a16 = _cuda("w8a16", ops.check_int8, reference.w8a16_linear)
cuda_w4a16 = _cuda("w4a16", ops.check_w4a16, reference.w4a16_linear)
cuda_w8a8 = _cuda("w8a8", ops.check_int8, reference.w8a8_linear)
cuda_sp24 = _cuda("sp24", ops.check_sp24, reference.sp24_linear)

ops.w8a16_linear.register_kernel("cuda")(cuda_w8a16)
ops.w4a16_linear.register_kernel("cuda")(cuda_w4a16)
ops.w8a8_linear.register_kernel("cuda")(cuda_w8a8)
ops.sp24_linear.register_kernel("cuda")(cuda_sp24)
