"""Pure-PyTorch reference implementations of every qruntime op.

Each function has the same signature as the registered op in :mod:`qruntime.ops.registry`. They are the last
resort implementation on any device and the oracle the kernel tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qruntime.formats.packing import dequantize_int4, dequantize_int8, dequantize_sp24


def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = x @ (qweight * scales[:, None]).T + bias.

    Args:
        x: float [M, K] (fp32, fp16 or bf16); the output has its dtype.
        qweight: int8 [N, K]. scales: float32 [N]. bias: [N] or None.
    """
    w = dequantize_int8(qweight, scales).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ dequant_int4(qweight).T + bias.

    Args:
        x: float [M, K]. qweight: uint8 [N, Kp / 2] (two codes a byte, docs/formats.md).
        scales: float32 [Kp / group_size, N]. zeros: uint8 [Kp / group_size, N] or None (symmetric).
        group_size: columns per group (Kp for per-channel). bias: [N] or None.
    """
    w = dequantize_int4(qweight, scales, zeros, group_size, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token (per-row) symmetric INT8 activations.

    ``a = max_k |x[m, k]| / 127`` and ``xq = round_half_even(x * (127 / max)).clamp(-127, 127)`` in
    float32 with IEEE divisions (a zero row gets ``a = 0``, codes 0; a row holding a NaN or an Inf gets
    ``a = NaN``, codes 0, so that its outputs are NaN rather than finite and wrong). The C++ and Triton
    kernels compute exactly this.

    Returns:
        (xq int8 [M, K], a float32 [M]).
    """
    x32 = x.to(torch.float32)
    amax = x32.abs().amax(dim=-1)
    # tensor / tensor: one IEEE division, as the kernels do (torch evaluates ``127.0 / t`` as
    # ``127 * (1 / t)``, two roundings, which flips a code now and then)
    c127 = torch.full_like(amax, 127.0)
    finite = torch.isfinite(x32).all(dim=-1)
    inv = torch.where((amax > 0) & finite, c127 / amax, torch.zeros_like(amax))
    xq = torch.round(torch.where(finite[:, None], x32, 0.0) * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    # a row holding a NaN or an Inf has scale NaN (and codes 0): every output of that row is NaN
    return xq, torch.where(finite, amax / c127, torch.full_like(amax, float("nan")))


def w8a8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y = a[m] * scales[n] * (xq @ qweight.T)[m, n] + bias, with ``xq, a = quantize_per_token(x)``.

    Args:
        x: float [M, K]; the output has its dtype. qweight: int8 [N, K]. scales: float32 [N].
    The integer products are summed exactly (float64), as the int32 accumulators of the kernels.
    """
    xq, a = quantize_per_token(x)
    acc = xq.to(torch.float64) @ qweight.to(torch.float64).T
    y = acc * a.to(torch.float64)[:, None] * scales.to(torch.float64)[None, :]
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


def sp24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y = x @ expand(values, meta).T + bias for a 2:4-sparse weight (docs/formats.md, "2:4 sparse").

    Args:
        x: float [M, K]; the output has its dtype. meta: uint8 [N, Kp / 8] (2-bit positions).
        values: the kept values: float [N, Kp / 2] (``scales`` None), INT8 codes [N, Kp / 2] (``scales``
            float32 [N]) or packed INT4 codes uint8 [N, Kp / 4] (``scales`` float32 [Kp / group_size, N],
            ``zeros`` uint8 of that shape or None for symmetric).
        group_size: INT4 only: dense columns per scale group (Kp for per-channel); else ignored.
        bias: [N] or None.
    """
    w = dequantize_sp24(values, meta, scales, zeros, group_size, x.shape[-1]).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
