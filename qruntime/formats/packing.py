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

from dataclasses import dataclass

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
    "dequantize_int4_codes",
    "pack_int4",
    "unpack_int4",
    "int4_padded_k",
    "nm_mask",
    "check_nm",
    "sp24_padded_k",
    "pack_sp24",
    "unpack_sp24",
    "sp24_positions",
    "dequantize_sp24",
]

INT8_MAX = 127
INT4_SYM_ZERO = 8  # symmetric INT4 codes are q + 8 with q in [-8, 7]


def check_weight(weight: torch.Tensor) -> None:
    """Refuses a weight the quantizers cannot take: not a tensor, not 2-D, or not floating point."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight: expected a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight: shape {tuple(weight.shape)}, expected 2 dims [out_features, in_features]")
    if not weight.is_floating_point():
        raise TypeError(f"weight: dtype {weight.dtype} is not a floating-point dtype")


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` with zeros replaced by 1: an all-zero row or group gets codes 0 (or the zero point),
    which dequantize to 0."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def int8_scales(weight: torch.Tensor) -> torch.Tensor:
    """Per-row symmetric INT8 scales: float32 [N] = absmax / 127 (1 for an all-zero row)."""
    check_weight(weight)
    return safe_scale(weight.detach().to(torch.float32).abs().amax(dim=1) / INT8_MAX).contiguous()


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
    check_weight(weight)
    n, k = weight.shape
    kp = int4_padded_k(k, group_size)
    gs = kp if group_size is None else group_size
    wg = pad_k(weight, kp).reshape(n, kp // gs, gs)
    if symmetric:
        return safe_scale(wg.abs().amax(dim=2) / 7).t().contiguous(), None, gs
    wmin = wg.amin(dim=2).clamp(max=0)
    wmax = wg.amax(dim=2).clamp(min=0)
    scales = safe_scale((wmax - wmin) / 15)
    zeros = torch.round(-wmin / scales).clamp_(0, 15)
    return scales.t().contiguous(), zeros.to(torch.uint8).t().contiguous(), gs


def pad_k(weight: torch.Tensor, kp: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``weight`` [N, K] as ``dtype``, zero-padded along K to ``kp`` columns."""
    n, k = weight.shape
    w = torch.zeros(n, kp, dtype=dtype, device=weight.device)
    w[:, :k] = weight.detach().to(dtype)
    return w


def int4_codes(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """Packed uint8 [N, Kp / 2] codes of ``weight`` [N, K] on the grid given by scales/zeros [G, N]."""
    n = weight.shape[0]
    g = scales.shape[0]
    kp = g * group_size
    wg = pad_k(weight, kp).to(torch.float64).reshape(n, g, group_size)
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
    return dequantize_int4_codes(unpack_int4(qweight).to(torch.float32), scales, zeros, group_size, in_features)


def dequantize_int4_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """:func:`dequantize_int4` of unpacked codes (float [N, Kp], any values; differentiable in the codes
    and the scales): float32 [N, in_features]."""
    n, kp = codes.shape
    z = zeros.to(torch.float32) if zeros is not None else torch.full_like(scales, INT4_SYM_ZERO, dtype=torch.float32)
    g = kp // group_size
    w = (codes.reshape(n, g, group_size) - z.t()[..., None]) * scales.to(torch.float32).t()[..., None]
    return w.reshape(n, kp)[:, :in_features]


# ---- 2:4 structured sparsity (docs/formats.md, "2:4 sparse") ----------------------------------------
#
# A 2:4-sparse weight W [N, K] keeps at most 2 nonzeros in every group of 4 consecutive input columns
# (4j .. 4j+3). K is zero-padded to Kp (a multiple of 8, and of the INT4 group size). Stored:
#   values [N, Kp / 2]: kept value c of row n is the (c % 2)-th kept entry of group c // 2 (K order);
#   meta uint8 [N, Kp / 8]: the 2-bit position (0..3) of kept value c in its group is
#       (meta[n, c // 4] >> (2 * (c % 4))) & 3, so dense column k(n, c) = 4 * (c // 2) + position;
#       the two positions of a group are strictly increasing.
# values may be float (fp32/fp16/bf16), INT8 codes (scales [N]) or INT4 codes packed two a byte
# ([N, Kp / 4], scales/zeros [Kp / g, N] over groups of g dense columns = g / 2 kept values).

SP24_META_MULTIPLE = 8  # four 2-bit positions a byte, two kept values a group of 4


def sp24_padded_k(in_features: int, group_size: int | None = None) -> int:
    """Kp of the 2:4 format: K rounded up to a multiple of 8 (and of ``group_size`` for INT4 groups)."""
    multiple = max(SP24_META_MULTIPLE, group_size or 0)
    return -(-in_features // multiple) * multiple


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Boolean mask [N, K] keeping the ``n`` largest ``scores`` of every group of ``m`` consecutive
    columns (along K, the input dimension); ties go to the lower column. The last group of a K that is
    not a multiple of ``m`` is padded with columns that are never kept (when it has <= n real columns,
    all are kept)."""
    if scores.dim() != 2:
        raise ValueError(f"scores: shape {tuple(scores.shape)}, expected 2 dims [N, K]")
    if not (isinstance(n, int) and isinstance(m, int) and 0 < n < m):
        raise ValueError(f"n={n!r}, m={m!r}: N:M sparsity needs integers 0 < n < m")
    rows, k = scores.shape
    kp = -(-k // m) * m
    s = torch.full((rows, kp), float("-inf"), dtype=torch.float64, device=scores.device)
    s[:, :k] = scores.detach().to(torch.float64)
    # a stable sort on the negated scores: equal scores keep the lower column
    order = torch.sort(-s.reshape(rows, kp // m, m), dim=2, stable=True).indices[..., :n]
    mask = torch.zeros(rows, kp // m, m, dtype=torch.bool, device=scores.device)
    mask.scatter_(2, order, True)
    return mask.reshape(rows, kp)[:, :k].contiguous()


def check_nm(weight: torch.Tensor, n: int = 2, m: int = 4) -> None:
    """Raises ValueError naming the first row and group of ``weight`` [N, K] with more than ``n``
    nonzeros among ``m`` consecutive columns."""
    rows, k = weight.shape
    kp = -(-k // m) * m
    nz = torch.zeros(rows, kp, dtype=torch.bool, device=weight.device)
    nz[:, :k] = weight != 0
    count = nz.reshape(rows, kp // m, m).sum(dim=2)
    bad = (count > n).nonzero()
    if len(bad):
        r, g = (int(v) for v in bad[0])
        raise ValueError(
            f"weight is not {n}:{m} sparse: row {r}, columns {g * m}..{g * m + m - 1} hold {int(count[r, g])} "
            f"nonzeros ({len(bad)} such groups); prune it first (qruntime.sparse.prune)"
        )


def pack_sp24(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Compresses a 2:4-sparse ``weight`` [N, K] into ``(values [N, Kp / 2] in weight's dtype, meta uint8
    [N, Kp / 8])``. The kept positions of a group are its nonzeros, completed (when it has fewer than 2)
    by its lowest zero columns, so the result is canonical. Raises ValueError if some group of 4 has more
    than 2 nonzeros."""
    check_weight(weight)
    check_nm(weight, 2, 4)
    n, k = weight.shape
    kp = sp24_padded_k(k, group_size)
    w = torch.zeros(n, kp, dtype=weight.dtype, device=weight.device)
    w[:, :k] = weight.detach()
    groups = w.reshape(n, kp // 4, 4)
    # nonzeros first, then the lowest columns; keep 2 and put them back in column order
    key = (groups == 0).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = torch.sort(torch.sort(key, dim=2).indices[..., :2], dim=2).values  # [N, Kp/4, 2]
    values = torch.gather(groups, 2, pos).reshape(n, kp // 2).contiguous()
    p = pos.reshape(n, kp // 8, 4).to(torch.uint8)
    meta = (p[..., 0] | (p[..., 1] << 2) | (p[..., 2] << 4) | (p[..., 3] << 6)).contiguous()
    return values, meta


def sp24_positions(meta: torch.Tensor) -> torch.Tensor:
    """int64 [N, Kp / 2]: the dense column of every kept value (``4 * (c // 2) + position``)."""
    if meta.dtype != torch.uint8 or meta.dim() != 2:
        raise ValueError(f"meta: dtype {meta.dtype}, shape {tuple(meta.shape)}; expected uint8 [N, Kp/8]")
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int64, device=meta.device)
    pos = (meta.to(torch.int64)[..., None] >> shifts) & 3  # [N, Kp/8, 4]
    n, c = meta.shape[0], meta.shape[1] * 4
    return pos.reshape(n, c) + 4 * (torch.arange(c, device=meta.device) // 2)


def unpack_sp24(values: torch.Tensor, meta: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense weight [N, in_features] of float ``values`` [N, Kp / 2] and ``meta`` (inverse of
    :func:`pack_sp24`), in values' dtype."""
    if values.dim() != 2 or meta.dim() != 2 or values.shape[0] != meta.shape[0] or values.shape[1] != 4 * meta.shape[1]:
        raise ValueError(
            f"values {tuple(values.shape)}, meta {tuple(meta.shape)}: expected [N, Kp/2] and [N, Kp/8]"
        )
    n, kp = values.shape[0], values.shape[1] * 2
    if not 0 < in_features <= kp:
        raise ValueError(f"in_features={in_features} does not fit the padded K={kp} of the 2:4 tensors")
    dense = torch.zeros(n, kp, dtype=values.dtype, device=values.device)
    dense.scatter_(1, sp24_positions(meta), values)
    return dense[:, :in_features]


def dequantize_sp24(
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The dense float32 weight [N, in_features] of a 2:4 layer whose kept values are float
    (``scales`` None), INT8 codes [N, Kp / 2] (``scales`` [N]) or packed INT4 codes [N, Kp / 4]
    (``scales`` / ``zeros`` [Kp / group_size, N], ``group_size`` in dense columns)."""
    if values.dtype == torch.int8:
        kept = dequantize_int8(values, scales)
    elif values.dtype == torch.uint8:
        kept = dequantize_int4(values, scales, zeros, group_size // 2, values.shape[1] * 2)
    else:
        kept = values.to(torch.float32)
    return unpack_sp24(kept, meta, in_features)


def check_group_size(group_size: int | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size={group_size!r}: must be an int or None (per-channel)")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size}: must be a power of two >= 16, or None for per-channel")



@dataclass(frozen=True)
class WeightFormat:
    """The packed format of one layer's weight, all a module needs to know (not the recipe that chose
    its codes).

    Attributes:
        bits: 8 (int8 codes, one scale per output channel, symmetric) or 4 (two codes per byte).
        group_size: INT4 only: consecutive input columns (along K) that share a scale and zero point; None
            is one per output channel.
        symmetric: INT4: no zero points (code 8 is zero); False: a 4-bit zero point per group.
        act_bits: 16 (float activations) or 8 (INT8 weights only: activations quantized per token at run
            time, int32 accumulation).
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    act_bits: int = 16

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r}: must be 8 or 4")
        check_group_size(self.group_size)
        if self.bits == 8 and self.group_size is not None:
            raise ValueError(f"bits=8 with group_size={self.group_size}: INT8 is per-channel only (group_size=None)")
        if self.bits == 8 and not self.symmetric:
            raise ValueError("bits=8 with symmetric=False: INT8 weights are symmetric only")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits={self.act_bits!r}: must be 16 or 8")
        if self.act_bits == 8 and self.bits != 8:
            raise ValueError(f"bits={self.bits} with act_bits=8: INT8 activations need INT8 weights (w8a8)")

    @property
    def name(self) -> str:
        """e.g. ``w8a16``, ``w8a8``, ``w4a16-g128-asym``, ``w4a16-sym`` (per channel)."""
        s = f"w{self.bits}a{self.act_bits}"
        if self.group_size is not None:
            s += f"-g{self.group_size}"
        if self.bits == 4:
            s += "-sym" if self.symmetric else "-asym"
        return s
