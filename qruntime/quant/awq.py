"""Activation-aware weight scaling (AWQ, Lin et al., 2023) for weight-only INT4/INT8, folded like
SmoothQuant so it costs nothing at run time.

Weight-only quantization errs on every column alike, but a column's error reaches the output in
proportion to its input's magnitude. Scaling input channel j of a group of layers by s_j (weights
W * s, inputs X / s, the division folded into the producing norm or Linear: :mod:`qruntime.quant.smoothquant`)
gives the columns with large inputs a finer grid relative to their size. Per group,

    s_j = rms(X_j)^alpha, normalized to geometric mean 1 over its range,

with alpha in :data:`ALPHA_GRID` chosen to minimize the group's output error after quantization,
computed exactly from the calibration Hessian H = X^T X / rows (no extra forward passes):

    sum over the group's layers of  tr(D H D^T) / tr(W H W^T),   D = Q(W * s) / s - W.

alpha = 0 (s = 1, nothing changes) is a candidate, so a group is never scaled unless that lowers its
error on the calibration data. Q is the recipe's round-to-nearest grid; clipping (``-mse``/``-clip``)
and GPTQ then run on the scaled weights with the rescaled Hessian.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .clip import quant_grid
from qruntime.formats.packing import dequantize_int4, dequantize_int8, int4_codes, int8_codes
from .smoothquant import MAX_SCALE, MIN_SCALE, SmoothGroup, plan_groups

__all__ = ["ALPHA_GRID", "awq_scales", "fake_quantize", "scaled_error", "plan_awq"]

ALPHA_GRID: tuple[float, ...] = tuple(i / 10 for i in range(11))  # 0.0, 0.1, ..., 1.0


def awq_scales(act_rms: torch.Tensor, alpha: float) -> torch.Tensor:
    """s [K] = rms^alpha / sqrt(max * min) over the channels that fired (1 for those that never did),
    clamped to the range SmoothQuant uses."""
    a = act_rms.to(torch.float32)
    live = a > 0
    if not live.any() or alpha == 0:
        return torch.ones_like(a)
    s = torch.where(live, a.clamp_min(1e-12).pow(alpha), torch.ones_like(a))
    s = s / (s[live].max() * s[live].min()).sqrt()
    return torch.where(live, s, torch.ones_like(s)).clamp(MIN_SCALE, MAX_SCALE)


def fake_quantize(weight: torch.Tensor, quant) -> torch.Tensor:
    """``weight`` [N, K] rounded to nearest on ``quant``'s grid (clip ignored), float32 [N, K]."""
    scales, zeros, gs = quant_grid(weight, replace(quant, clip="none"))
    if quant.bits == 8:
        return dequantize_int8(int8_codes(weight, scales), scales)
    return dequantize_int4(int4_codes(weight, scales, zeros, gs), scales, zeros, gs, weight.shape[1])


def scaled_error(weights: list[torch.Tensor], hessian: torch.Tensor, s: torch.Tensor, quant) -> float:
    """The group's relative output error with input scaling ``s``: sum tr(D H D^T) / sum tr(W H W^T),
    D = Q(W * s) / s - W, for the layers ``weights`` [N, K] sharing the input whose X^T X / rows is
    ``hessian`` [K, K]."""
    h = hessian.to(torch.float32)
    s = s.to(device=h.device, dtype=torch.float32)
    err = ref = 0.0
    for w in weights:
        w = w.detach().to(device=h.device, dtype=torch.float32)
        d = fake_quantize(w * s, quant) / s - w
        err += float(((d @ h) * d).sum())
        ref += float(((w @ h) * w).sum())
    return err / ref if ref > 0 else 0.0


def plan_awq(model, targets: dict, hessians: dict, quant, grid: tuple[float, ...] = ALPHA_GRID, check=None):
    """What compress() needs from AWQ (as :func:`qruntime.quant.smoothquant.plan_smoothing` for SmoothQuant): the
    scales of every foldable group of ``targets`` with alpha searched per group on the calibration
    Hessians, the folded tensors (the model is not touched), the report entry; the Hessians of scaled
    layers are rescaled in place; ``check``: see :func:`qruntime.quant.smoothquant.plan_groups`."""

    def choose(group: SmoothGroup, weights: list[torch.Tensor]) -> dict | str:
        h = next((hessians[c][0] for c in group.consumers if c in hessians), None)
        if h is None:
            return "calibration data never reached it"
        rms = torch.diagonal(h).clamp_min(0).sqrt().to(torch.float32)
        errors = {a: scaled_error(weights, h, awq_scales(rms, a), quant) for a in grid}
        best = min(errors, key=errors.get)
        group.scales = awq_scales(rms, best)
        return {"alpha": best, "output_error": {f"{a:g}": e for a, e in errors.items()}}

    return plan_groups(model, targets, hessians, choose, {"method": "awq", "alpha": "auto"}, check)
