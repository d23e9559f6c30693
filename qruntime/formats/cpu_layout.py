"""CPU layouts: the canonical packed weights (:mod:`qruntime.formats.packing`) re-laid out for the C++ kernels.

Converted once per weight, on the first CPU call, and cached beside the weight (docs/formats.md,
"CPU layouts", has the byte order). Output channels go in blocks of :data:`BLOCK_N` = 32 (N padded
with zero codes) so a kernel streams one contiguous panel per block and keeps 32 outputs in registers:

* ``int8_panels``: int8 ``[NB, K, 32]``, ``p[b, k, j] = q[32 b + j, k]`` (W8A16).
* ``int8_vnni``: int8 ``[NB, ceil(K / 4), 32, 4]``, ``p[b, s, j, i] = q[32 b + j, 4 s + i]`` (K padded
  with zeros), plus ``wsum`` int32 ``[NB * 32]`` = sum_k q[n, k] (W8A8; four consecutive k of one
  channel are the four bytes a VNNI dot product multiplies).
* ``int4_panels``: uint8 ``[NB, Kp, 16]``, byte ``p[b, k, j]`` = code(32 b + j, k) in the low nibble and
  code(32 b + 16 + j, k) in the high nibble.

* ``sp24``: 2:4-sparse weights (docs/formats.md, "2:4 sparse"): per block and group of 4 input columns,
  the two kept values of the 32 channels, ``[NB, Kp / 4, 2, 32]`` (float32, bf16, or int8 codes; INT4
  codes two a byte as in ``int4_panels``: ``[NB, Kp / 4, 2, 16]``), and the 2-bit positions as one
  uint32 word per channel and 8 groups, ``[NB, ceil(Kp / 32), 32]`` (the channel's canonical meta bytes
  read as little-endian words).

Every ``pack_*`` has an exact inverse ``unpack_*`` (tested round trips).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .packing import INT4_SYM_ZERO, pack_int4, unpack_int4

__all__ = [
    "BLOCK_N",
    "pack_int8_panels",
    "unpack_int8_panels",
    "pack_int8_vnni",
    "unpack_int8_vnni",
    "pack_int4_panels",
    "unpack_int4_panels",
    "pad_channels",
    "CpuInt8",
    "CpuInt4",
    "cpu_int8",
    "cpu_int4",
    "CpuSp24",
    "cpu_sp24",
    "unpack_cpu_sp24",
]

BLOCK_N = 32


def _blocks(n: int) -> int:
    return -(-n // BLOCK_N)


def _pad_n(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    n = t.shape[dim]
    pad = _blocks(n) * BLOCK_N - n
    if not pad:
        return t
    pads = [0, 0] * (t.dim() - 1 - dim) + [0, pad]
    return F.pad(t, pads)


def pad_channels(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """float32 contiguous copy of ``v`` with its channel dim padded with zeros to a multiple of 32."""
    dim = dim % v.dim()
    return _pad_n(v.detach().to(torch.float32), dim).contiguous()


def pack_int8_panels(qweight: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> int8 [NB, K, 32]."""
    n, k = qweight.shape
    return _pad_n(qweight).reshape(_blocks(n), BLOCK_N, k).transpose(1, 2).contiguous()


def unpack_int8_panels(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_int8_panels`."""
    nb, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(nb * BLOCK_N, k)[:n].contiguous()


def pack_int8_vnni(qweight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> (int8 [NB, ceil(K/4), 32, 4], wsum int32 [NB * 32])."""
    n, k = qweight.shape
    k4 = -(-k // 4) * 4
    q = F.pad(_pad_n(qweight), (0, k4 - k))
    packed = q.reshape(_blocks(n), BLOCK_N, k4 // 4, 4).transpose(1, 2).contiguous()
    wsum = q.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return packed, wsum.contiguous()


def unpack_int8_vnni(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_int8_vnni` (the packed weights; wsum is derived)."""
    nb, steps, _, _ = packed.shape
    return packed.transpose(1, 2).reshape(nb * BLOCK_N, steps * 4)[:n, :k].contiguous()


def pack_int4_panels(qweight: torch.Tensor) -> torch.Tensor:
    """Canonical uint8 [N, Kp / 2] -> uint8 [NB, Kp, 16] (two channels 16 apart share a byte)."""
    n = qweight.shape[0]
    codes = _pad_n(unpack_int4(qweight))  # [NB*32, Kp]
    kp = codes.shape[1]
    panels = codes.reshape(_blocks(n), BLOCK_N, kp).transpose(1, 2)  # [NB, Kp, 32]
    return (panels[..., :16] | (panels[..., 16:] << 4)).contiguous()


def unpack_int4_panels(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Exact inverse of :func:`pack_int4_panels`: back to the canonical uint8 [N, Kp / 2]."""
    nb, kp, _ = packed.shape
    panels = torch.cat((packed & 0x0F, packed >> 4), dim=2)  # [NB, Kp, 32]
    codes = panels.transpose(1, 2).reshape(nb * BLOCK_N, kp)[:n]
    return pack_int4(codes.contiguous())


@dataclass(frozen=True)
class CpuInt8:
    """An INT8 per-channel weight in both CPU layouts (built lazily: ``panels`` for W8A16, ``vnni``
    and ``wsum`` for W8A8); ``scales`` padded to NB * 32."""

    n: int
    k: int
    scales: torch.Tensor
    panels: torch.Tensor | None = None
    vnni: torch.Tensor | None = None
    wsum: torch.Tensor | None = None


@dataclass(frozen=True)
class CpuInt4:
    """An INT4 weight in the CPU layout with its scales ``s`` and zero terms ``zs = -zero * s`` padded
    to NB * 32 channels (float32 [G, NB * 32])."""

    n: int
    kp: int
    panels: torch.Tensor
    s: torch.Tensor
    zs: torch.Tensor


def cpu_int8(qweight: torch.Tensor, scales: torch.Tensor, act_bits: int) -> CpuInt8:
    n, k = qweight.shape
    s = pad_channels(scales)
    if act_bits == 8:
        vnni, wsum = pack_int8_vnni(qweight)
        return CpuInt8(n, k, s, vnni=vnni, wsum=wsum)
    return CpuInt8(n, k, s, panels=pack_int8_panels(qweight))


def cpu_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> CpuInt4:
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    s = pad_channels(scales)
    z = torch.full_like(s, INT4_SYM_ZERO) if zeros is None else pad_channels(zeros.to(torch.float32))
    return CpuInt4(n, kp, pack_int4_panels(qweight), s, (-z * s).contiguous())


# ---- 2:4 sparse ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CpuSp24:
    """A 2:4-sparse weight in the CPU layout.

    ``values``: the kept values ``[NB, Kp / 4, 2, 32]`` (``v[b, g, s, j]`` = slot ``s`` of group ``g`` of
    channel ``32 b + j``, i.e. canonical kept value ``2 g + s``): float32 (fp32 and fp16 layers: fp16 is
    widened once, exactly), bfloat16, or int8 codes; INT4: uint8 ``[NB, Kp / 4, 2, 16]``, byte ``j`` =
    code of lane ``j`` (low nibble) and lane ``j + 16`` (high nibble). Padding channels hold zeros.
    ``meta``: int32 ``[NB, ceil(Kp / 32), 32]``, word ``[b, w, j]`` = canonical meta bytes ``4 w .. 4 w + 3``
    of channel ``32 b + j`` (little endian; zero past Kp / 8): position of slot ``s`` of group ``g`` at bits
    ``4 (g % 8) + 2 s`` of word ``g // 8``. ``s``: INT8 row scales ``[NB * 32]``, INT4 scales
    ``[Kp / g, NB * 32]``, else None; ``zs``: INT4 ``-zero * s`` (zero 8 when symmetric), else None.
    ``dtype``: the canonical values' dtype (for :func:`unpack_cpu_sp24`)."""

    n: int
    kp: int
    values: torch.Tensor
    meta: torch.Tensor
    s: torch.Tensor | None
    zs: torch.Tensor | None
    group_size: int
    dtype: torch.dtype


def _sp24_slots(kept: torch.Tensor) -> torch.Tensor:
    """[N, Kp / 2] kept values -> [NB, Kp / 4, 2, 32] (channels padded with zeros)."""
    n, c = kept.shape
    return _pad_n(kept).reshape(_blocks(n), BLOCK_N, c // 2, 2).permute(0, 2, 3, 1).contiguous()


def _sp24_unslot(slots: torch.Tensor, n: int) -> torch.Tensor:
    nb, groups, _, _ = slots.shape
    return slots.permute(0, 3, 1, 2).reshape(nb * BLOCK_N, 2 * groups)[:n].contiguous()


def cpu_sp24(
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    group_size: int,
) -> CpuSp24:
    """The CPU layout of the canonical 2:4 tensors (``values``, ``meta``, ``scales``, ``zeros``,
    ``group_size`` as taken by :func:`qruntime.ops.registry.sp24_linear`)."""
    n, kp = meta.shape[0], meta.shape[1] * 8
    words = -(-kp // 32)
    m = F.pad(meta.detach().cpu(), (0, 4 * words - meta.shape[1])).contiguous().view(torch.int32)  # [N, words]
    meta_l = _pad_n(m).reshape(_blocks(n), BLOCK_N, words).transpose(1, 2).contiguous()
    s = zs = None
    if values.dtype == torch.uint8:  # INT4 codes
        codes = _sp24_slots(unpack_int4(values.detach().cpu()))  # [NB, Kp/4, 2, 32]
        vals = (codes[..., :16] | (codes[..., 16:] << 4)).contiguous()
        s = pad_channels(scales)
        z = torch.full_like(s, INT4_SYM_ZERO) if zeros is None else pad_channels(zeros.to(torch.float32))
        zs = (-z * s).contiguous()
    elif values.dtype == torch.int8:
        vals = _sp24_slots(values.detach().cpu())
        s = pad_channels(scales)
    elif values.dtype == torch.bfloat16:
        vals = _sp24_slots(values.detach().cpu())
    else:  # fp32, fp16 (widened exactly), and any other float dtype
        vals = _sp24_slots(values.detach().cpu().to(torch.float32))
    return CpuSp24(n, kp, vals, meta_l, s, zs, group_size, values.dtype)


def unpack_cpu_sp24(layout: CpuSp24) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inverse of :func:`cpu_sp24` for the weights: the canonical ``(values, meta)``."""
    n, kp = layout.n, layout.kp
    nb, words, _ = layout.meta.shape
    meta = layout.meta.transpose(1, 2).reshape(nb * BLOCK_N, words).contiguous().view(torch.uint8)
    meta = meta[:n, : kp // 8].contiguous()
    if layout.dtype == torch.uint8:
        v = layout.values
        codes = torch.cat((v & 0x0F, v >> 4), dim=3)
        values = pack_int4(_sp24_unslot(codes, n))
    else:
        values = _sp24_unslot(layout.values, n).to(layout.dtype)
    return values, meta
