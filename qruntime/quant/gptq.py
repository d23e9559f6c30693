"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer inputs, with lazy
batch updates. The grid (scales, zero points) is fixed beforehand from the original weight, so the
result is encoded in the same packed format as round-to-nearest.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["gptq_quantize", "column_quantizer", "masked_quantizer"]


def column_quantizer(
    bits: int, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Returns ``f(k, w_col [N]) -> w_col rounded onto the grid of column k`` (float64).

    ``scales``: float32 [N] (INT8) or [G, N] (INT4); ``zeros``: uint8 [G, N] or None.
    """
    if bits == 8:
        s8 = scales.to(torch.float64)
        return lambda k, w: torch.round(w / s8).clamp_(-127, 127) * s8
    s4 = scales.to(torch.float64)
    if zeros is None:
        return lambda k, w: torch.round(w / s4[k // group_size]).clamp_(-8, 7) * s4[k // group_size]
    z4 = zeros.to(torch.float64)

    def asym(k: int, w: torch.Tensor) -> torch.Tensor:
        s, z = s4[k // group_size], z4[k // group_size]
        return (torch.round(w / s).add_(z).clamp_(0, 15) - z) * s

    return asym


def _inverse_cholesky(h: torch.Tensor, damp: float, what: str) -> torch.Tensor:
    """The upper Cholesky factor of the inverse of ``h`` + damping (float64 [K, K]), damping ``damp`` times
    the mean diagonal, raised tenfold up to three times while ``h`` is not positive definite. At most
    three [K, K] matrices are alive at once (``h`` included): each step replaces the one before it.

    Raises:
        ValueError: not positive definite even with 1000 x ``damp`` (``what`` names the layer's shape).
    """
    mean_diag = torch.mean(torch.diag(h)).item()
    for attempt in range(4):
        factor = h.clone()
        factor.diagonal().add_((damp * 10**attempt) * mean_diag)
        try:
            factor = torch.linalg.cholesky(factor)
            factor = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(factor, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"GPTQ: the Hessian of a {what} layer is not positive definite even with "
                     f"{damp * 1000:g} x its mean diagonal added (1000 x damp={damp:g})")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quantize_column: Callable[[int, torch.Tensor], torch.Tensor],
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
    return_unrounded: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Args:
        weight: float [N, K]. hessian: [K, K], X^T X of the layer inputs (any positive scale).
        quantize_column: see :func:`column_quantizer`; always called with the original column index.
        act_order: quantize columns in order of decreasing Hessian diagonal (largest inputs first), so
            their error is spread over the most columns. The grid stays that of the original column
            (static groups), so the packed format and kernels do not change.
        return_unrounded: also return the weights each column was rounded from (the original column plus
            the error spread onto it from the columns quantized before it).
    Returns:
        float64 [N, K] in the original column order, every value on the grid of ``quantize_column``;
        with ``return_unrounded``, (that, the unrounded weights float64 [N, K] in the original order).
    """
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian: shape {tuple(hessian.shape)}, expected ({k}, {k}) for weight {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64, copy=True)
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=h.device)
    w, h = w[:, perm], h[perm[:, None], perm]  # one gather: no [K, K] intermediate
    order = perm.tolist()
    h_inv = _inverse_cholesky(h, damp, f"[{n}, {k}]")
    del h

    q = torch.zeros_like(w)
    unrounded = torch.zeros_like(w) if return_unrounded else None
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w_blk = w[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        h_blk = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w_blk[:, i]
            if unrounded is not None:
                unrounded[:, i1 + i] = col
            qcol = quantize_column(order[i1 + i], col)
            q[:, i1 + i] = qcol
            err = (col - qcol) / h_blk[i, i]
            w_blk[:, i:] -= err[:, None] * h_blk[i, i:][None, :]
            err_blk[:, i] = err
        w[:, i2:] -= err_blk @ h_inv[i1:i2, i2:]
    out = torch.empty_like(q)
    out[:, perm] = q
    if unrounded is None:
        return out
    before = torch.empty_like(unrounded)
    before[:, perm] = unrounded
    return out, before


def masked_quantizer(
    quantize_column: Callable[[int, torch.Tensor], torch.Tensor], mask: torch.Tensor
) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A GPTQ column quantizer that rounds pruned weights to exactly 0 and kept ones to the grid."""
    keep = mask.to(torch.float64)
    return lambda k, w: quantize_column(k, w) * keep[:, k].to(w.device)
