"""Packing a 2:4-pruned weight into a :class:`~qruntime.nn.modules.SparseLinear`: kept values in float, or
quantized by a :class:`~qruntime.quant.config.QuantConfig` (round to nearest, or GPTQ with the mask fixed).
"""
from __future__ import annotations

import torch
from torch import nn

from qruntime.formats.packing import int4_codes, int4_params, int8_codes, int8_scales, pack_sp24, sp24_padded_k, sp24_positions
from qruntime.nn.modules import SparseLinear
from qruntime.quant.config import QuantConfig
from qruntime.quant.gptq import column_quantizer, gptq_quantize, masked_quantizer

__all__ = ["pack_pruned"]


def pack_pruned(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    quant: QuantConfig | None = None,
    hessian: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> SparseLinear:
    """Packs a 2:4-pruned ``weight`` [N, K] (every group of 4 along K has >= 2 zeros; ValueError
    otherwise). With ``quant`` the kept values are quantized: the grid (scales, zero points) is that
    of round to nearest on the pruned weight; with ``quant.method == "gptq"`` and ``hessian`` the
    codes are chosen by GPTQ with the mask fixed (pruned weights stay exactly 0)."""

    n, k = weight.shape
    dtype = dtype or weight.dtype
    out = SparseLinear(k, n, None if quant is None else quant.format, bias=bias is not None, dtype=dtype, device=weight.device)
    mask = weight != 0
    if quant is None:
        out.values, out.meta = pack_sp24(weight.detach().to(dtype))
    else:
        w32 = weight.detach().to(torch.float32)
        grouped = quant.group_size if quant.bits == 4 else None
        kp = sp24_padded_k(k, grouped)
        if quant.bits == 8:
            scales, zeros, gs = int8_scales(w32), None, k
        else:
            wp = torch.zeros(n, kp, dtype=torch.float32, device=weight.device)
            wp[:, :k] = w32
            scales, zeros, gs = int4_params(wp, quant.group_size, quant.symmetric)
        target = w32.to(torch.float64)
        if hessian is not None and quant.method == "gptq":
            quantizer = masked_quantizer(column_quantizer(quant.bits, scales, zeros, gs), mask)
            target = gptq_quantize(w32, hessian, quantizer, damp=quant.gptq_damp,
                                   block_size=quant.gptq_block_size, act_order=quant.gptq_act_order)
        # pack the mask (a kept weight may round to 0: positions come from the mask, not the values)
        _, meta = pack_sp24(torch.where(mask, 1.0, 0.0).to(torch.float32), grouped)
        pos_values = _gather_kept(target, meta, kp)
        if quant.bits == 8:
            out.values, out.scales = int8_codes(pos_values, scales), scales
        else:
            out.values, out.scales = int4_codes(pos_values, scales, zeros, gs // 2), scales
            if zeros is not None:
                out.zeros = zeros
        out.meta = meta
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=bias.requires_grad)
    return out


def _gather_kept(weight: torch.Tensor, meta: torch.Tensor, kp: int) -> torch.Tensor:
    """The entries of ``weight`` [N, K] at the kept positions of ``meta``: float [N, Kp / 2]."""
    n, k = weight.shape
    padded = torch.zeros(n, kp, dtype=weight.dtype, device=weight.device)
    padded[:, :k] = weight
    return torch.gather(padded, 1, sp24_positions(meta))
