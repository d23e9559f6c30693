"""N:M structured pruning of Linear weights: magnitude, Wanda and SparseGPT.

Every method keeps ``n`` of every ``m`` consecutive weights along K (the input dimension) of each
output row; 2:4 is what the kernels run (``SparseLinear``), other N:M patterns (e.g. 4:8) are for
experiments on dense weights (:func:`prune_model`).

* ``magnitude``: keep the largest ``|W|`` (no data).
* ``wanda`` (Sun et al., 2023): keep the largest ``|W[n, k]| * ||X[:, k]||_2`` over the calibration
  inputs X of the layer (no weight update).
* ``sparsegpt`` (Frantar & Alistarh, 2023): column by column, choose each group's mask by
  ``W^2 / [H^-1]_kk^2`` and spread the error of the pruned weights over the columns not yet visited,
  through the inverse Hessian ``H = X^T X`` (as GPTQ does with rounding errors), so the kept weights
  are updated to compensate.

With quantization after pruning (``2:4+w8a16-gptq``), GPTQ runs on the pruned weight with the mask
fixed: the pruned weights are "rounded" to 0, the kept ones to the grid (:func:`masked_quantizer`).
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from qruntime.formats.packing import nm_mask
from qruntime.quant.gptq import masked_quantizer

__all__ = ["prune_weight", "sparsegpt_prune", "wanda_scores", "masked_quantizer", "prune_model", "PRUNE_METHODS"]

# 2:4 mask methods -> what each keeps
PRUNE_METHODS: dict[str, str] = {
    "magnitude": "keep the largest |W| of each group (no data)",
    "wanda": "keep the largest |W| x ||X||_2 of each group (activation norms from calibration data)",
    "sparsegpt": "Hessian-aware mask with an update of the kept weights (calibration data)",
}


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``|W[n, k]| * sqrt(H[k, k])``: with ``H = X^T X / rows`` that is Wanda's ``|W| ||X_k||`` up to
    a constant factor, which does not change the ranking within a row. float64 [N, K]."""
    return weight.detach().to(torch.float64).abs() * torch.diag(hessian).to(torch.float64).clamp_min(0).sqrt()


def _inverse_cholesky(h: torch.Tensor, damp: float, shape: tuple[int, int]) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``, more damping if needed."""
    k = h.shape[0]
    mean_diag = torch.mean(torch.diag(h)).item()
    for attempt in range(4):
        try:
            hd = h + (damp * 10**attempt) * mean_diag * torch.eye(k, dtype=h.dtype, device=h.device)
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError(f"SparseGPT: the Hessian of a {list(shape)} layer is not positive definite even with damping")


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    n: int = 2,
    m: int = 4,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT with an N:M mask chosen group by group in column order.

    Args:
        weight: float [N, K]. hessian: [K, K] = X^T X of the layer inputs (any positive scale).
        n, m: keep n of every m consecutive columns. block_size: columns updated together (lazy batch
            updates; rounded down to a multiple of m).
    Returns:
        (pruned float64 [N, K] with exactly the mask's zeros, mask bool [N, K]: True = kept).
    """
    rows, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian: shape {tuple(hessian.shape)}, expected ({k}, {k}) for weight {tuple(weight.shape)}")
    if block_size < m:
        raise ValueError(f"block_size={block_size}: must be >= m={m}")
    block_size -= block_size % m
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64, copy=True)
    dead = torch.diag(h) == 0  # inputs that were always zero: their weights never matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h_inv = _inverse_cholesky(h, damp, (rows, k))
    mask = torch.zeros(rows, k, dtype=torch.bool, device=w.device)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w_blk = w[:, i1:i2].clone()
        err_blk = torch.zeros_like(w_blk)
        h_blk = h_inv[i1:i2, i1:i2]
        d = torch.diag(h_blk)
        for i in range(i2 - i1):
            if i % m == 0:  # the group's mask, on the weights as updated so far
                j = min(i + m, i2 - i1)
                scores = w_blk[:, i:j] ** 2 / d[i:j] ** 2
                mask[:, i1 + i : i1 + j] = nm_mask(scores, n, m)
            col = w_blk[:, i]
            q = torch.where(mask[:, i1 + i], col, torch.zeros_like(col))
            err = (col - q) / h_blk[i, i]
            w_blk[:, i:] -= err[:, None] * h_blk[i, i:][None, :]
            w_blk[:, i] = q
            err_blk[:, i] = err
        w[:, i1:i2] = w_blk
        w[:, i2:] -= err_blk @ h_inv[i1:i2, i2:]
    return w * mask, mask


def prune_weight(
    weight: torch.Tensor,
    method: str,
    hessian: torch.Tensor | None = None,
    n: int = 2,
    m: int = 4,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes ``weight`` [N, K] to N:M along K.

    Returns:
        (pruned weight float64 [N, K], mask bool [N, K], True = kept). ``wanda`` and ``sparsegpt`` need
        ``hessian`` (X^T X / rows of the layer's calibration inputs).
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method={method!r}: must be one of {sorted(PRUNE_METHODS)}")
    if method != "magnitude" and hessian is None:
        raise ValueError(f"method={method!r} needs the layer's calibration Hessian (X^T X); 'magnitude' needs none")
    w = weight.detach().to(torch.float64)
    if method == "sparsegpt":
        return sparsegpt_prune(w, hessian, n, m, damp=damp, block_size=block_size)
    scores = w.abs() if method == "magnitude" else wanda_scores(w, hessian)
    mask = nm_mask(scores, n, m)
    return w * mask, mask


@torch.no_grad()
def prune_model(
    model: nn.Module,
    method: str = "magnitude",
    n: int = 2,
    m: int = 4,
    calib_data: Iterable | None = None,
    *,
    include: Iterable[str] = ("*",),
    exclude: Iterable[str] | None = None,
    damp: float = 0.01,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Prunes the Linear/Conv1D weights of ``model`` in place to N:M (they stay dense tensors with
    zeros), e.g. to measure 4:8 against 2:4, or to fine-tune with the masks fixed before packing.

    Returns:
        ({parameter name: float mask of the parameter's shape (1 = kept)}, [(layer, reason) skipped]);
        the masks feed :func:`qruntime.distill`'s ``masks=`` for recovery.
    """
    from qruntime.calibration.stats import collect_stats
    from qruntime.nn.modules import is_conv1d, linear_weight
    from qruntime.nn.targets import DEFAULT_EXCLUDE, exclude_match, layer_kind, output_head, validate_target

    exclude = tuple(DEFAULT_EXCLUDE if exclude is None else exclude)
    include = tuple(include)
    targets, skipped = {}, []
    head = output_head(model)
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None:
            continue
        if kind in ("QuantLinear", "SparseLinear"):
            skipped.append((name, f"already a {kind}"))
        elif not any(fnmatch.fnmatchcase(name, p) for p in include):
            skipped.append((name, f"not matched by include={list(include)}"))
        elif hit := exclude_match(name, module, exclude, head):
            skipped.append((name, f"matches exclude pattern {hit!r}"))
        else:
            validate_target(name, module)
            targets[name] = module
    hessians = {}
    if method != "magnitude":
        if calib_data is None:
            raise ValueError(f"method={method!r} needs calib_data (batches of input ids); 'magnitude' needs none")
        hessians = collect_stats(model, targets, calib_data, progress=progress)[0]
    masks = {}
    from tqdm.auto import tqdm

    for name, module in tqdm(targets.items(), desc=f"prune {n}:{m} {method}", unit="layer", disable=not progress):
        h = hessians.get(name, (None, 0))[0]
        if method != "magnitude" and h is None:
            skipped.append((name, "calibration data never reached this layer"))
            continue
        pruned, mask = prune_weight(linear_weight(module), method, h, n, m, damp=damp)
        param = module.weight
        if is_conv1d(module):  # Conv1D stores [in_features, out_features]
            pruned, mask = pruned.t(), mask.t()
        param.copy_(pruned.to(param.dtype))
        masks[f"{name}.weight" if name else "weight"] = mask.to(param.dtype).contiguous()
    return masks, skipped

