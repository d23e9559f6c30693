"""CPU layouts: the canonical packed weights (:mod:`qruntime.formats`) re-laid out for the C++ kernels.

Converted once per weight, on the first CPU call, and cached beside the weight (docs/formats.md,
"CPU layouts", has the byte order). Output channels go in blocks of :data:`BLOCK_N` = 32 (N padded
with zero codes) so a kernel streams one contiguous panel per block and keeps 32 outputs in registers:

* ``int8_panels``: int8 ``[NB, K, 32]``, ``p[b, k, j] = q[32 b + j, k]`` (W8A16).
* ``int8_vnni``: int8 ``[NB, ceil(K / 4), 32, 4]``, ``p[b, s, j, i] = q[32 b + j, 4 s + i]`` (K padded
  with zeros), plus ``wsum`` int32 ``[NB * 32]`` = sum_k q[n, k] (W8A8; four consecutive k of one
  channel are the four bytes a VNNI dot product multiplies).
* ``int4_panels``: uint8 ``[NB, Kp, 16]``, byte ``p[b, k, j]`` = code(32 b + j, k) in the low nibble and
  code(32 b + 16 + j, k) in the high nibble.

Every ``pack_*`` has an exact inverse ``unpack_*`` (tested round trips).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import INT4_SYM_ZERO, pack_int4, unpack_int4

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
