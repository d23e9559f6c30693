"""Mixed precision under an accuracy budget: the most sensitive layers get a higher-precision format
until the compressed model's perplexity is within ``max_ppl_increase`` of the original's.

1. Sensitivity of each target: the estimated increase of the loss when it alone is quantized
   (:func:`fisher_sensitivity`: one forward and backward pass of the float model per batch for all
   layers), divided by the bytes its fallback format costs extra: the layers that buy the most accuracy
   per byte come first.
2. Every target is prepared in both formats (the recipe's and the fallback: INT8 per channel, or the
   original float layer). With the k most sensitive layers in the fallback format, the model's
   perplexity on the budget data is *measured*; a binary search finds the smallest k whose ratio to
   the original's perplexity is <= 1 + max_ppl_increase (about log2(layers) evaluations). The model is
   only borrowed during the search: every swapped module and parameter is restored on every path.

The budget holds on the data it was measured on (the ``eval_data`` given to compress, else the
calibration batches); the report names that data and every trial, and says if even k = all layers
misses the budget.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qruntime.calibration.stats import check_token_ids
from qruntime.plumbing.offload import execution_device
from qruntime.plumbing.model import logits_of, model_forward, model_inputs, token_logprobs

__all__ = ["perplexity", "fisher_sensitivity", "budget_search", "swapped"]


def _token_logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's logits [batch, seq, vocab] for ``inputs``, or a ValueError saying what came back."""
    logits = logits_of(model_forward(model, inputs))
    seq = inputs["input_ids"].shape[1]
    if logits is None or logits.dim() != 3 or logits.shape[1] != seq:
        found = "none" if logits is None else f"shape {tuple(logits.shape)}"
        raise ValueError(
            f"{type(model).__name__} returns no per-token logits [batch, seq, vocab] (found {found}): the "
            "accuracy budget (max_ppl_increase) needs a causal LM"
        )
    return logits


@torch.no_grad()
def perplexity(model: nn.Module, batches: Iterable) -> float:
    """exp(mean next-token cross-entropy) over every scored position of ``batches`` (input-id tensors
    [B, T] or dicts with ``input_ids`` and optionally ``attention_mask``: masked positions are not scored)."""
    device = execution_device(model)
    total, count = 0.0, 0
    for batch in batches:
        inputs = model_inputs(batch, device)
        check_token_ids(model, inputs, "accuracy budget batch")
        logits = _token_logits(model, inputs)
        labels = inputs["input_ids"][:, 1:]
        mask = inputs.get("attention_mask")
        keep = torch.ones_like(labels, dtype=torch.bool) if mask is None else mask[:, 1:].bool()
        nll = -token_logprobs(logits[:, :-1], labels)[1]
        total += float(nll[keep].sum())
        count += int(keep.sum())
    if count == 0:
        raise ValueError("the accuracy budget's data has no token to score (need batches of >= 2 tokens)")
    return math.exp(total / count)


def fisher_sensitivity(
    model: nn.Module,
    deltas: dict[str, torch.Tensor],
    batches: Iterable,
    params: dict[str, dict[str, torch.Tensor]] | None = None,
) -> dict[str, float]:
    """Each layer's estimated increase of the mean next-token loss when it alone is quantized:

        0.5 * sum over tokens and outputs of (g * dY)^2,   dY = X D^T,  g = dLoss/dY

    with ``D = W - deq(Q)`` from ``deltas`` ([N, K] per layer name, in the layout of the weight the model
    holds once ``params`` are swapped in) and g the gradient of the float model's mean loss on
    ``batches`` (a second-order expansion with the diagonal empirical Fisher). One forward and backward
    pass per batch covers every layer. Parameters get no gradient (``torch.autograd.grad`` with respect
    to the embedding output only) and everything is restored afterwards."""
    device = execution_device(model)
    totals = {name: 0.0 for name in deltas}
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if emb is None:
        with torch.no_grad():
            for batch in batches:
                _token_logits(model, model_inputs(batch, device))  # an encoder: the clearer error first
        raise ValueError(f"{type(model).__name__} has no get_input_embeddings(): no gradient to weigh the layers with")
    roots: list[torch.Tensor] = []

    def root_hook(module, args, output):  # the graph starts at the embedding output
        out = output.detach().requires_grad_(True)
        roots.append(out)
        return out

    def layer_hook(name: str):
        d = deltas[name].to(device=device, dtype=torch.float32)

        def hook(module, args, output):
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                dy = x.reshape(-1, x.shape[-1]).to(torch.float32) @ d.t()
                totals[name] += 0.5 * float(((g.reshape(dy.shape).to(torch.float32) * dy) ** 2).sum())

            if output.requires_grad:
                output.register_hook(on_grad)

        return hook

    modules = {name: model.get_submodule(name) for name in deltas}
    with swapped(model, {}, params or {}):
        handles = [emb.register_forward_hook(root_hook)]
        handles += [modules[name].register_forward_hook(layer_hook(name)) for name in deltas]
        try:
            with torch.enable_grad():
                for batch in batches:
                    inputs = model_inputs(batch, device)
                    check_token_ids(model, inputs, "sensitivity batch")
                    roots.clear()
                    logits = _token_logits(model, inputs)
                    if not roots:
                        raise ValueError(f"{type(model).__name__}: its input embedding was not called")
                    labels = inputs["input_ids"][:, 1:]
                    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))
                    torch.autograd.grad(loss, roots)
        finally:
            for h in handles:
                h.remove()
            roots.clear()
    return totals


@contextlib.contextmanager
def swapped(model: nn.Module, modules: dict[str, nn.Module], params: dict[str, dict[str, torch.Tensor]]):
    """``model`` with the named submodules replaced and the named modules' parameters set (e.g. folded
    norms), all restored on exit."""
    saved_modules = {name: model.get_submodule(name) for name in modules}
    saved_params = {name: {attr: getattr(model.get_submodule(name), attr) for attr in entry}
                    for name, entry in params.items()}
    try:
        for name, entry in params.items():
            module = model.get_submodule(name)
            for attr, value in entry.items():
                setattr(module, attr, nn.Parameter(value, requires_grad=False))
        for name, module in modules.items():
            model.set_submodule(name, module)
        yield model
    finally:
        for name, module in saved_modules.items():
            model.set_submodule(name, module)
        for name, entry in saved_params.items():
            module = model.get_submodule(name)
            for attr, value in entry.items():
                setattr(module, attr, value)


def budget_search(
    model: nn.Module,
    low: dict[str, nn.Module],
    high: dict[str, nn.Module],
    sensitivity: dict[str, float],
    params: dict[str, dict[str, torch.Tensor]],
    batches: list,
    max_ppl_increase: float,
    progress: bool = True,
    fixed: dict[str, nn.Module] | None = None,
    measure: Callable[[nn.Module, list], float] | None = None,
) -> tuple[set[str], dict]:
    """Returns (the layers to give the fallback format, the report entry).

    ``low`` / ``high``: each target's module in the recipe's format / the fallback format (the same
    keys); ``sensitivity``: the ranking score (higher: promoted first); ``measure(model, batches)``: default :func:`perplexity`; ``params``: parameters the quantized model needs
    besides its layers (folded norms of SmoothQuant/AWQ), and ``fixed``: other replaced modules (a
    quantized embedding), both swapped in with them in every trial.
    """
    measure = measure or perplexity
    order = sorted(low, key=lambda n: -sensitivity[n])
    reference = measure(model, batches)
    limit = reference * (1 + max_ppl_increase)
    trials: dict[int, float] = {}
    bar = tqdm(desc=f"accuracy budget (ppl <= {limit:.3f})", unit="eval", disable=not progress)

    def ppl(k: int) -> float:
        if k not in trials:
            chosen = dict(fixed or {}) | {n: (high[n] if i < k else low[n]) for i, n in enumerate(order)}
            with swapped(model, chosen, params):
                trials[k] = measure(model, batches)
            bar.update(1)
            bar.set_postfix(k=k, ppl=f"{trials[k]:.3f}")
        return trials[k]

    try:
        if ppl(0) <= limit:
            k = 0
        elif ppl(len(order)) > limit:
            k = len(order)
        else:  # smallest k with ppl(k) <= limit, assuming ppl falls as k grows; ppl(k) itself is measured
            lo, hi = 0, len(order)  # ppl(lo) > limit >= ppl(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if ppl(mid) <= limit:
                    hi = mid
                else:
                    lo = mid
            k = hi
    finally:
        bar.close()
    report = {
        "max_ppl_increase": max_ppl_increase,
        "reference_perplexity": reference,
        "perplexity": trials[k],
        "perplexity_ratio": trials[k] / reference,
        "met": trials[k] <= limit,
        "promoted": order[:k],
        "layers": len(order),
        "trials": [{"promoted": i, "perplexity": p} for i, p in sorted(trials.items())],
        "batches": len(batches),
    }
    return set(order[:k]), report
