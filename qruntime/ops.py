"""The registered qruntime ops: one ``torch.library.custom_op`` each, backends hung off its handle.

* default: the PyTorch reference (:mod:`qruntime.reference`), used on any device without a kernel;
* ``cpu``: the C++ extension (dequantize in C++, then the BLAS GEMM) when it is built;
* ``cuda``: Triton kernels, registered by :mod:`qruntime.kernels` when they exist;
* fake: shape functions, so ``torch.compile`` and ``torch.export`` trace compressed models.

Call them as ``qruntime.ops.w8a16_linear(...)`` or ``torch.ops.qruntime.w8a16_linear(...)``.
"""
from __future__ import annotations

import torch

from . import reference
from .formats import dequantize_int4, dequantize_int8
from ._ext import extension

__all__ = ["w8a16_linear", "w4a16_linear", "cpu_backend"]


def _check_common(x: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: shape {tuple(x.shape)}, expected 2 dims [M, K]")
    if not x.is_floating_point():
        raise TypeError(f"x: dtype {x.dtype} is not a floating-point dtype")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({n},)")


def _check_w8a16(x, qweight, scales, bias) -> None:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"qweight: dtype {qweight.dtype}, shape {tuple(qweight.shape)}; expected int8 [N, K]")
    n, k = qweight.shape
    _check_common(x, bias, n)
    if x.shape[1] != k:
        raise ValueError(f"x: shape {tuple(x.shape)} has K={x.shape[1]}, qweight has K={k}")
    if tuple(scales.shape) != (n,):
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected ({n},)")


def _check_w4a16(x, qweight, scales, zeros, group_size, bias) -> None:
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight: dtype {qweight.dtype}, shape {tuple(qweight.shape)}; expected uint8 [N, Kp/2]")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    _check_common(x, bias, n)
    if group_size <= 0 or kp % group_size:
        raise ValueError(f"group_size={group_size}: must divide the padded K={kp}")
    if not kp - group_size < x.shape[1] <= kp:
        raise ValueError(f"x: K={x.shape[1]} does not match qweight's padded K={kp} (group_size={group_size})")
    g = kp // group_size
    if tuple(scales.shape) != (g, n):
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected ({g}, {n})")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (g, n)):
        raise ValueError(f"zeros: dtype {zeros.dtype}, shape {tuple(zeros.shape)}; expected uint8 ({g}, {n})")


@torch.library.custom_op("qruntime::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (qweight int8 [N, K] * scales f32 [N]).T + bias; output dtype = x.dtype."""
    _check_w8a16(x, qweight, scales, bias)
    return reference.w8a16_linear(x, qweight, scales, bias)


@torch.library.custom_op("qruntime::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant_int4(qweight u8 [N, Kp/2], scales [G, N], zeros [G, N] | None).T + bias."""
    _check_w4a16(x, qweight, scales, zeros, group_size, bias)
    return reference.w4a16_linear(x, qweight, scales, zeros, group_size, bias)


@w8a16_linear.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


# Autograd with respect to x and bias (the packed weights are constants), so adapters or a distillation
# step can train around a quantized layer.
def _w8a16_setup(ctx, inputs, output):
    x, qweight, scales, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None


def _w8a16_backward(ctx, grad):
    qweight, scales = ctx.saved_tensors
    w = dequantize_int8(qweight, scales).to(grad.dtype)
    return grad @ w, None, None, grad.sum(0) if ctx.has_bias else None


def _w4a16_setup(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size, ctx.in_features, ctx.has_bias = group_size, x.shape[1], bias is not None


def _w4a16_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    w = dequantize_int4(qweight, scales, zeros, ctx.group_size, ctx.in_features).to(grad.dtype)
    return grad @ w, None, None, None, None, grad.sum(0) if ctx.has_bias else None


w8a16_linear.register_autograd(_w8a16_backward, setup_context=_w8a16_setup)
w4a16_linear.register_autograd(_w4a16_backward, setup_context=_w4a16_setup)


# ---- CPU: dequantize in C++ (threaded), then torch's BLAS GEMM ------------------------------------

def _cpu_w8a16(x, qweight, scales, bias):
    _check_w8a16(x, qweight, scales, bias)
    w = torch.empty(qweight.shape, dtype=torch.float32)
    extension().dequantize_int8(
        qweight.contiguous().numpy(), scales.float().contiguous().numpy(), w.numpy(), torch.get_num_threads()
    )
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _cpu_w4a16(x, qweight, scales, zeros, group_size, bias):
    _check_w4a16(x, qweight, scales, zeros, group_size, bias)
    w = torch.empty((qweight.shape[0], x.shape[1]), dtype=torch.float32)
    extension().dequantize_int4(
        qweight.contiguous().numpy(),
        scales.float().contiguous().numpy(),
        None if zeros is None else zeros.contiguous().numpy(),
        group_size,
        w.numpy(),
        torch.get_num_threads(),
    )
    return torch.nn.functional.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))


if extension() is not None:
    w8a16_linear.register_kernel("cpu")(_cpu_w8a16)
    w4a16_linear.register_kernel("cpu")(_cpu_w4a16)


def cpu_backend() -> str:
    """Which implementation the CPU ops run: ``"cpp"`` (the extension) or ``"reference"``."""
    return "cpp" if extension() is not None else "reference"
