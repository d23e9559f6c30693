"""Quantizing one Linear layer by a :class:`~qruntime.quant.config.QuantConfig`: its grid (round to nearest's,
or searched by :mod:`qruntime.quant.clip`) and its codes (rounded to nearest, or chosen by GPTQ), packed
into a :class:`~qruntime.nn.modules.QuantLinear` of the recipe's format.
"""
from __future__ import annotations

import torch
from torch import nn

from qruntime.formats.packing import INT4_SYM_ZERO, int4_codes, int8_codes, pad_k
from qruntime.nn.modules import QuantLinear, linear_weight

from .clip import quant_grid
from .config import QuantConfig
from .gptq import column_quantizer, gptq_quantize

__all__ = ["quantize_linear", "quantize_linear_unrounded"]


def quantize_linear(module: nn.Module, quant: QuantConfig, hessian: torch.Tensor | None = None) -> QuantLinear:
    """Quantizes an ``nn.Linear`` or a ``transformers`` ``Conv1D`` into a :class:`QuantLinear` of ``quant.format``.

    Scales and zero points come from the weight itself: round to nearest's grid, or with
    ``quant.clip`` a searched one (:mod:`qruntime.quant.clip`). ``hessian`` (float [K, K], X^T X of the
    layer's calibration inputs) weights that search (clip "act") and, with ``quant.method == "gptq"``,
    the codes are chosen by GPTQ on the grid.
    """
    return _quantize(module, quant, hessian, unrounded=False)[0]

def quantize_linear_unrounded(
    module: nn.Module, quant: QuantConfig, hessian: torch.Tensor | None = None
) -> tuple[QuantLinear, torch.Tensor]:
    """:func:`quantize_linear`, and the values its codes were rounded from, in code units (float32):
    ``w / s`` [N, K] for INT8, ``w / s + zero`` [N, Kp] for INT4 (K zero-padded as the codes are;
    symmetric: zero 8), where ``w`` is the weight, or with GPTQ each weight as GPTQ rounded it (the
    original plus the error spread onto it from the columns quantized before). Rounded to nearest
    and clamped to the code range, they are the codes (block output tuning's ``-round`` starts there).
    """
    return _quantize(module, quant, hessian, unrounded=True)

def _quantize(module: nn.Module, quant: QuantConfig, hessian: torch.Tensor | None, *, unrounded: bool):
    weight = linear_weight(module)
    n, k = weight.shape
    bias = module.bias
    out = QuantLinear(k, n, quant.format, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    scales, zeros, group_size = quant_grid(weight, quant, hessian)
    target = before = weight
    if hessian is not None and quant.method == "gptq":
        target = gptq_quantize(
            weight,
            hessian,
            column_quantizer(quant.bits, scales, zeros, group_size),
            damp=quant.gptq_damp,
            block_size=quant.gptq_block_size,
            act_order=quant.gptq_act_order,
            return_unrounded=unrounded,
        )
        if unrounded:
            target, before = target
    values = None
    if quant.bits == 8:
        out.qweight, out.scales = int8_codes(target, scales), scales
        if unrounded:
            values = before.detach().to(torch.float64) / scales.to(torch.float64)[:, None]
    else:
        out.qweight, out.scales = int4_codes(target, scales, zeros, group_size), scales
        if zeros is not None:
            out.zeros = zeros
        if unrounded:
            g = scales.shape[0]
            z = zeros.t() if zeros is not None else torch.full((n, g), INT4_SYM_ZERO, device=weight.device)
            w = pad_k(before, g * group_size, torch.float64).reshape(n, g, group_size)
            values = (w / scales.to(torch.float64).t()[..., None] + z.to(torch.float64)[..., None]).reshape(n, -1)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
    return out, (values.to(torch.float32) if unrounded else None)
