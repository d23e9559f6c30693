"""Packed weight formats and their pure-PyTorch quantize / pack / dequantize primitives.

The exact bit layouts are in docs/formats.md; in short, for a Linear with weight W [N, K]
(N = out_features, K = in_features):

* INT8 per-channel symmetric: ``qweight`` int8 [N, K] (row-major, like ``nn.Linear.weight``),
  ``scales`` float32 [N]; ``W[n, k] ~= qweight[n, k] * scales[n]``, codes in [-127, 127].
* INT4 grouped: K is zero-padded to ``Kp`` (a multiple of the group size; per-channel: K rounded up to
  even) and split into ``G = Kp / group_size`` groups. ``qweight`` uint8 [N, Kp / 2] holds two 4-bit
  codes per byte: column ``k`` is in byte ``k // 2``, the low nibble for even ``k``, the high nibble
  for odd ``k``. ``scales`` float32 [G, N]; ``zeros`` uint8 [G, N] with values 0..15 (asymmetric) or
  absent (symmetric: implicit zero point 8). ``W[n, k] ~= (code(n, k) - zero[k // gs, n]) * scales[k // gs, n]``.
"""
from __future__ import annotations

import torch

__all__ = [
    "int8_scales",
    "int8_codes",
    "int4_params",
    "int4_codes",
    "quantize_int8_per_channel",
    "dequantize_int8",
    "quantize_int4",
    "dequantize_int4",
    "pack_int4",
    "unpack_int4",
    "int4_padded_k",
]

INT8_MAX = 127
INT4_SYM_ZERO = 8  # symmetric INT4 codes are q + 8 with q in [-8, 7]


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected 2 dims [out_features, in_features]")
    if not weight.is_floating_point():
        raise TypeError(f"weight: dtype {weight.dtype} is not a floating-point dtype")


def _safe_scale(scale: torch.Tensor) -> torch.Tensor:
    # An all-zero row or group gets scale 1: its codes are 0 (or the zero point) and dequantize to 0.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric INT8 scales: float32 [N] = absmax / 127 (1 for an all-zero row)."""
    _check_weight(weight)
    return _safe_scale(weight.detach().to(torch.float32).abs().amax(dim=1) / INT8_MAX).contiguous()


def int8_codes(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] = clamp(round(weight / scales[:, None]), -127, 127)."""
    w = weight.detach().to(torch.float64)
    return torch.round(w / scales.to(torch.float64)[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8).contiguous()


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest INT8, one scale per output row.

    Args:
        weight: float [N, K].
    Returns:
        (qweight int8 [N, K], scales float32 [N]).
    """
    scales = int8_scales(weight)
    return int8_codes(weight, scales), scales


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 [N, K], float32 [N] -> float32 [N, K]."""
    return qweight.to(torch.float32) * scales.to(torch.float32)[:, None]


def int4_padded_k(in_features: int, group_size: int | None) -> int:
    """K after zero padding: a multiple of group_size, or of 2 for per-channel (two codes a byte)."""
    multiple = group_size if group_size is not None else 2
    return -(-in_features // multiple) * multiple


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp] codes in 0..15 (Kp even) -> uint8 [N, Kp / 2]; even k in the low nibble."""
    if codes.dtype != torch.uint8 or codes.dim() != 2 or codes.shape[1] % 2:
        raise ValueError(f"codes: dtype {codes.dtype}, shape {tuple(codes.shape)}; expected uint8 [N, even K]")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes: max {int(codes.max())} does not fit in 4 bits")
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, Kp / 2] -> uint8 codes [N, Kp], the exact inverse of :func:`pack_int4`."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed: dtype {packed.dtype}, shape {tuple(packed.shape)}; expected uint8 [N, Kp/2]")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=2).reshape(packed.shape[0], -1)


def int4_params(
    weight: torch.Tensor, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """Scales and zero points of round-to-nearest INT4 for ``weight`` [N, K].

    Symmetric: ``s = absmax / 7`` per group, codes ``q + 8`` with ``q = round(w / s)`` in [-8, 7].
    Asymmetric: ``s = (max - min) / 15`` over the group with 0 included in [min, max], integer zero
    point ``z = round(-min / s)`` and codes ``round(w / s) + z`` in [0, 15].

    Returns:
        (scales float32 [G, N], zeros uint8 [G, N] or None, group size used), where the group size used
        is ``Kp`` for per-channel.
    """
    _check_weight(weight)
    n, k = weight.shape
    kp = int4_padded_k(k, group_size)
    gs = kp if group_size is None else group_size
    wg = _pad_k(weight, kp).reshape(n, kp // gs, gs)
    if symmetric:
        return _safe_scale(wg.abs().amax(dim=2) / 7).t().contiguous(), None, gs
    wmin = wg.amin(dim=2).clamp(max=0)
    wmax = wg.amax(dim=2).clamp(min=0)
    scales = _safe_scale((wmax - wmin) / 15)
    zeros = torch.round(-wmin / scales).clamp_(0, 15)
    return scales.t().contiguous(), zeros.to(torch.uint8).t().contiguous(), gs


def _pad_k(weight: torch.Tensor, kp: int) -> torch.Tensor:
    n, k = weight.shape
    w = torch.zeros(n, kp, dtype=torch.float32, device=weight.device)
    w[:, :k] = weight.detach().to(torch.float32)
    return w


def int4_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Packed uint8 [N, Kp / 2] codes of ``weight`` [N, K] on the grid given by scales/zeros [G, N]."""
    n = weight.shape[0]
    g = scales.shape[0]
    kp = g * group_size
    wg = _pad_k(weight, kp).to(torch.float64).reshape(n, g, group_size)
    s = scales.to(torch.float64).t()[..., None]
    if zeros is None:
        q = torch.round(wg / s).clamp_(-8, 7) + INT4_SYM_ZERO
    else:
        q = (torch.round(wg / s) + zeros.to(torch.float64).t()[..., None]).clamp_(0, 15)
    return pack_int4(q.to(torch.uint8).reshape(n, kp))


def quantize_int4(
    weight: torch.Tensor, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """Round-to-nearest INT4, per group of ``group_size`` input columns (None: per output channel).

    Args:
        weight: float [N, K].
        group_size: power of two >= 16, or None.
        symmetric: see :func:`int4_params`.
    Returns:
        (qweight uint8 [N, Kp / 2], scales float32 [G, N], zeros uint8 [G, N] or None, group size used).
    """
    scales, zeros, gs = int4_params(weight, group_size, symmetric)
    return int4_codes(weight, scales, zeros, gs), scales, zeros, gs


def dequantize_int4(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` up to rounding: returns float32 [N, in_features]."""
    codes = unpack_int4(qweight).to(torch.float32)  # [N, Kp]
    n, kp = codes.shape
    z = zeros.to(torch.float32) if zeros is not None else torch.full_like(scales, INT4_SYM_ZERO, dtype=torch.float32)
    g = kp // group_size
    w = (codes.reshape(n, g, group_size) - z.t()[..., None]) * scales.to(torch.float32).t()[..., None]
    return w.reshape(n, kp)[:, :in_features]
