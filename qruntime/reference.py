"""Pure-PyTorch reference implementations of every qruntime op.

Each function has the same signature as the registered op in :mod:`qruntime.ops`. They are the last
resort implementation on any device and the oracle the kernel tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import dequantize_int4, dequantize_int8


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
