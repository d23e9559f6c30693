"""Clipping search: the scales (and zero points) of a weight's quantization grid chosen to minimize the
rounding error instead of covering the full range of each group.

Round to nearest sets a group's range to its extremes, so one large weight stretches the step of the
whole group. Shrinking the range by a factor p clips the extremes but rounds the rest more finely. For
each group (INT4) or row (INT8) the search tries p in :data:`SHRINK_GRID` and keeps the one with the
smallest error

    sum_k  importance_k * (w_k - q_k(p))^2

where importance is 1 ("mse": the weight error, no data) or the mean squared input of column k over the
calibration data, the diagonal of X^T X / rows ("act": activation-aware; the error of the layer's output
when its inputs are uncorrelated). p = 1 is always a candidate, so the search never does worse than round
to nearest on its own measure. The grid is in the same format as round to nearest (scales, zero points),
so kernels and packing are unchanged, and GPTQ can round on it afterwards.
"""
from __future__ import annotations

import torch

from qruntime.formats.packing import INT8_MAX, check_weight, pad_k, safe_scale, int4_padded_k

__all__ = ["SHRINK_GRID", "search_int8_scales", "search_int4_params", "quant_grid"]

SHRINK_GRID: tuple[float, ...] = tuple(round(1 - 0.02 * i, 2) for i in range(26))  # 1.00, 0.98, ..., 0.50


def _importance(importance: torch.Tensor | None, k: int, kp: int, device) -> torch.Tensor:
    if importance is None:
        return torch.ones(kp, dtype=torch.float32, device=device)
    if importance.shape != (k,):
        raise ValueError(f"importance: shape {tuple(importance.shape)}, expected [{k}] (one value per input column)")
    if not torch.isfinite(importance).all() or (importance < 0).any():
        raise ValueError("importance: must be finite and >= 0 (the mean squared input of each column)")
    out = torch.zeros(kp, dtype=torch.float32, device=device)
    out[:k] = importance.to(device=device, dtype=torch.float32)
    return out


def search_int8_scales(weight: torch.Tensor, importance: torch.Tensor | None = None,
                       grid: tuple[float, ...] = SHRINK_GRID) -> torch.Tensor:
    """Per-row symmetric INT8 scales float32 [N] (as :func:`qruntime.formats.packing.int8_scales`), each row's
    range shrunk by the factor of ``grid`` with the smallest (importance-weighted) squared error."""
    check_weight(weight)
    w = weight.detach().to(torch.float32)
    imp = _importance(importance, w.shape[1], w.shape[1], w.device)
    amax = w.abs().amax(dim=1)
    best_err = torch.full_like(amax, float("inf"))
    best = safe_scale(amax / INT8_MAX)
    for p in grid:
        s = safe_scale(amax * p / INT8_MAX)
        q = torch.round(w / s[:, None]).clamp_(-INT8_MAX, INT8_MAX) * s[:, None]
        err = ((w - q) ** 2 * imp).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best.contiguous()


def search_int4_params(
    weight: torch.Tensor, group_size: int | None, symmetric: bool, importance: torch.Tensor | None = None,
    grid: tuple[float, ...] = SHRINK_GRID,
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """INT4 scales and zero points as :func:`qruntime.formats.packing.int4_params` returns them (scales float32
    [G, N], zeros uint8 [G, N] or None, group size used), each group's range shrunk by the factor of
    ``grid`` with the smallest (importance-weighted) squared error. Asymmetric: min and max are both
    scaled by p and the integer zero point recomputed."""
    check_weight(weight)
    n, k = weight.shape
    kp = int4_padded_k(k, group_size)
    gs = kp if group_size is None else group_size
    g = kp // gs
    wg = pad_k(weight, kp).reshape(n, g, gs)
    imp = _importance(importance, k, kp, wg.device).reshape(1, g, gs)
    best_err = torch.full((n, g), float("inf"), device=wg.device)
    if symmetric:
        amax = wg.abs().amax(dim=2)
        best_s = safe_scale(amax / 7)
        for p in grid:
            s = safe_scale(amax * p / 7)[..., None]
            q = torch.round(wg / s).clamp_(-8, 7) * s
            err = ((wg - q) ** 2 * imp).sum(dim=2)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s[..., 0], best_s)
        return best_s.t().contiguous(), None, gs
    wmin = wg.amin(dim=2).clamp(max=0)
    wmax = wg.amax(dim=2).clamp(min=0)
    best_s = safe_scale((wmax - wmin) / 15)
    best_z = torch.round(-wmin / best_s).clamp_(0, 15)
    for p in grid:
        s = safe_scale(p * (wmax - wmin) / 15)
        z = torch.round(-p * wmin / s).clamp_(0, 15)
        q = (torch.round(wg / s[..., None]).add_(z[..., None]).clamp_(0, 15) - z[..., None]) * s[..., None]
        err = ((wg - q) ** 2 * imp).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s.t().contiguous(), best_z.to(torch.uint8).t().contiguous(), gs


def quant_grid(
    weight: torch.Tensor, quant, hessian: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """The grid ``quant`` (a :class:`qruntime.quant.config.QuantConfig`) asks for: (scales, zeros or None,
    group size used; K for INT8). ``quant.clip`` "none": round to nearest's; "mse": searched; "act":
    searched with the diagonal of ``hessian`` [K, K] (X^T X / rows) as importance (required)."""
    from qruntime.formats.packing import int4_params, int8_scales

    if quant.clip == "act" and hessian is None:
        raise ValueError(f"quant={quant.name}: clip='act' needs the layer's calibration Hessian (no data reached it)")
    importance = torch.diagonal(hessian).to(torch.float32) if quant.clip == "act" else None
    if quant.bits == 8:
        if quant.clip == "none":
            return int8_scales(weight), None, weight.shape[1]
        return search_int8_scales(weight, importance), None, weight.shape[1]
    if quant.clip == "none":
        return int4_params(weight, quant.group_size, quant.symmetric)
    return search_int4_params(weight, quant.group_size, quant.symmetric, importance)
