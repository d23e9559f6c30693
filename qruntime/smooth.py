"""SmoothQuant for W8A8: move activation outliers into the weights, folded into the preceding norm.

Per-token INT8 activations lose the small channels of a row when a few channels are large (outliers).
For a group of Linear layers reading the same input X, SmoothQuant divides input channel j by

    s_j = max|X_j|^alpha / max_n |W[n, j]|^(1 - alpha)          (over the group's calibration inputs / weights)

and multiplies column j of every consumer's weight by s_j: X W^T = (X / s)(W * s)^T. The division is
folded into whatever produces X (a LayerNorm / RMSNorm's weight and bias, or the rows of a Linear), so
the float model computes the same function and the runtime pays nothing.

A fold is valid only where the producer's output reaches nothing but the group: pre-norm blocks (Llama
family: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up_proj -> down_proj; GPT-2:
ln_1 -> c_attn, ln_2 -> c_fc). Post-norm models (BERT) use the norm's output as the residual stream too,
so their layers are left unsmoothed, and every layer without a valid producer is listed with the reason.

alpha is one number for the model (0.5 by default), or searched per group ("auto"): the value of
:data:`ALPHA_GRID` with the smallest W8A8 output error on sample rows of the group's calibration inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .nn import is_conv1d, linear_weight

__all__ = ["SmoothGroup", "find_groups", "smoothing_scales", "search_alpha", "fold", "plan_smoothing", "plan_groups", "apply"]

_MIN_SCALE, _MAX_SCALE = 1e-5, 1e5


@dataclass
class SmoothGroup:
    producer: str  # module whose output is the consumers' input: a norm or a Linear
    consumers: list[str]  # Linear / Conv1D layers reading exactly that output
    scales: torch.Tensor | None = field(default=None, repr=False)  # float32 [K], once computed


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _is_norm(module: nn.Module | None) -> bool:
    return module is not None and isinstance(getattr(module, "weight", None), torch.Tensor) and (
        isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")
    )


def find_groups(model: nn.Module, targets: set[str]) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The foldable groups whose consumers are all in ``targets``, and for every other target the
    reason it is not smoothed."""
    groups: list[SmoothGroup] = []
    for name, block in model.named_modules():
        prefix = f"{name}." if name else ""
        if hasattr(block, "input_layernorm") and hasattr(block, "post_attention_layernorm"):  # Llama family
            candidates = [
                ("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                ("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]),
                ("mlp.up_proj", ["mlp.down_proj"]),
            ]
        elif hasattr(block, "ln_1") and hasattr(block, "ln_2") and hasattr(block, "attn"):  # GPT-2
            candidates = [("ln_1", ["attn.c_attn"]), ("ln_2", ["mlp.c_fc"])]
        else:
            continue
        for producer, consumers in candidates:
            p = _get(block, producer)
            present = [c for c in consumers if _get(block, c) is not None]
            if not present or not (_is_norm(p) or isinstance(p, nn.Linear)):
                continue
            names = [prefix + c for c in present]
            if all(n in targets for n in names):
                groups.append(SmoothGroup(prefix + producer, names))
    smoothed = {c for g in groups for c in g.consumers}
    post_norm = any(type(m).__name__.startswith(("Bert", "Roberta", "Electra")) for m in model.modules())
    reason = (
        "post-norm model: the norm's output is also the residual stream, folding would change the model"
        if post_norm
        else "no foldable producer (its input comes from attention, an activation function or is shared)"
    )
    return groups, {t: reason for t in sorted(targets) if t not in smoothed}


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] = absmax_X^alpha / absmax_W^(1 - alpha), clamped; 1 where a channel never fired."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    a = act_absmax.to(torch.float32)
    s = a.pow(alpha) / w_absmax.clamp_min(1e-12).pow(1 - alpha)
    s = torch.where((a > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(_MIN_SCALE, _MAX_SCALE)


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """Relative output error of W8A8 on sample inputs ``x`` [R, K] for the group's weights smoothed by
    ``s``: || X W^T - deq(Q_token(X / s)) deq(Q_channel(W * s))^T || / || X W^T || over all weights."""
    from .formats import quantize_int8_per_channel
    from .reference import quantize_per_token

    xs = x.to(torch.float32) / s
    xq, a = quantize_per_token(xs)
    x_deq = xq.to(torch.float64) * a.to(torch.float64)[:, None]
    err = ref = 0.0
    for w in weights:
        w = w.detach()
        q, scales = quantize_int8_per_channel(w.to(torch.float32) * s)
        y = x.to(torch.float64) @ w.to(torch.float64).t()
        y_q = x_deq @ (q.to(torch.float64) * scales.to(torch.float64)[:, None]).t()
        err += float(((y - y_q) ** 2).sum())
        ref += float((y**2).sum())
    return (err / ref) ** 0.5 if ref > 0 else 0.0


def search_alpha(act_absmax: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                 grid=ALPHA_GRID) -> tuple[float, torch.Tensor, dict[float, float]]:
    """The alpha of ``grid`` whose smoothing gives the smallest :func:`w8a8_error` on ``x``: (alpha,
    scales, error per alpha)."""
    errors = {a: w8a8_error(x, weights, smoothing_scales(act_absmax, weights, a)) for a in grid}
    best = min(errors, key=errors.get)
    return best, smoothing_scales(act_absmax, weights, best), errors


def fold(model: nn.Module, groups: list[SmoothGroup]) -> dict[str, dict[str, torch.Tensor]]:
    """The smoothed tensors, without touching ``model``: ``{module name: {"weight": ..., "bias": ...}}``
    for every producer and consumer, weights in their module's own layout (Conv1D: [K, N]). A Linear
    that is both (up_proj) gets both changes."""
    new: dict[str, dict[str, torch.Tensor]] = {}

    def current(name: str) -> dict[str, torch.Tensor]:
        if name not in new:
            module = model.get_submodule(name)
            entry = {"weight": module.weight.detach().clone()}
            if getattr(module, "bias", None) is not None:
                entry["bias"] = module.bias.detach().clone()
            new[name] = entry
        return new[name]

    for group in groups:
        s = group.scales
        for name in group.consumers:  # column j of W [N, K] times s_j
            entry, module = current(name), model.get_submodule(name)
            w = entry["weight"]
            scale = s.to(device=w.device, dtype=torch.float32)
            entry["weight"] = (w.float() * (scale[:, None] if is_conv1d(module) else scale[None, :])).to(w.dtype)
        entry, module = current(group.producer), model.get_submodule(group.producer)
        inv = (1.0 / s).to(device=entry["weight"].device, dtype=torch.float32)
        if isinstance(module, nn.Linear):  # output channel j (row j of [N, K]) divided by s_j
            entry["weight"] = (entry["weight"].float() * inv[:, None]).to(entry["weight"].dtype)
        else:  # norm: elementwise weight (and bias)
            entry["weight"] = (entry["weight"].float() * inv).to(entry["weight"].dtype)
        if "bias" in entry:
            entry["bias"] = (entry["bias"].float() * inv).to(entry["bias"].dtype)
    return new


def as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A throw-away nn.Linear holding ``weight`` [N, K] (a smoothed weight to quantize)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def plan_smoothing(model, targets: dict[str, nn.Module], absmax: dict[str, torch.Tensor], alpha: float, hessians):
    """What compress() needs from SmoothQuant: the scales of every foldable group of ``targets``
    (``alpha`` a number, or "auto" to search it per group on the ``"<name>#rows"`` samples of
    ``absmax``), the smoothed tensors (:func:`fold`; the model is not touched) and the report entry.
    The Hessians of smoothed layers (GPTQ) are rescaled in place to the smoothed inputs."""

    def choose(group: SmoothGroup, weights: list[torch.Tensor]) -> dict | str:
        peaks = [absmax[c] for c in group.consumers if c in absmax]
        if not peaks:
            return "calibration data never reached it"
        peak = torch.stack(peaks).amax(dim=0)
        rows = absmax.get(f"{group.consumers[0]}#rows")
        if alpha == "auto" and rows is not None:
            chosen, group.scales, errors = search_alpha(peak, rows.to(peak.device), weights)
            return {"alpha": chosen, "sample_error": {f"{a:g}": e for a, e in errors.items()}}
        group.scales = smoothing_scales(peak, weights, 0.5 if alpha == "auto" else alpha)
        return {"alpha": 0.5 if alpha == "auto" else alpha}

    return plan_groups(model, targets, hessians, choose, {"method": "smoothquant", "alpha": alpha})


def plan_groups(model, targets: dict[str, nn.Module], hessians, choose, header: dict):
    """Shared by SmoothQuant and AWQ: for every foldable group of ``targets`` (:func:`find_groups`),
    ``choose(group, weights)`` sets ``group.scales`` and returns its report entry, or returns the reason
    it is left alone. Returns the folded tensors (:func:`fold`; the model is not touched) and the report
    (``header`` + groups, layers not scaled with reasons, and the consumers with their alpha). The
    Hessians of scaled layers are rescaled in place to the scaled inputs: X' = X / s."""
    groups, not_smoothed = find_groups(model, set(targets))
    entries = []
    for group in groups:
        entry = choose(group, [linear_weight(targets[c]) for c in group.consumers])
        if isinstance(entry, str):
            group.scales = None
            for c in group.consumers:
                not_smoothed[c] = entry
            continue
        entries.append({"producer": group.producer, "consumers": group.consumers} | entry
                       | {"scale_min": float(group.scales.min()), "scale_max": float(group.scales.max())})
    groups = [g for g in groups if g.scales is not None]
    for group in groups:  # X' = X / s: H' = diag(1/s) H diag(1/s)
        inv = (1.0 / group.scales).to(torch.float64)
        for c in group.consumers:
            if c in hessians:
                h, rows = hessians[c]
                hessians[c] = (h * inv.to(h.device)[:, None] * inv.to(h.device)[None, :], rows)
    with torch.no_grad():
        tensors = fold(model, groups)
    report = header | {"groups": entries,
                       "not_smoothed": [{"layer": k, "reason": v} for k, v in sorted(not_smoothed.items())],
                       "consumers": {c for g in groups for c in g.consumers},
                       "alpha_of": {c: e["alpha"] for e in entries for c in e["consumers"]}}
    return tensors, report


def apply(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Writes :func:`fold`'s tensors into ``model`` (in place, as new Parameters)."""
    for name, entry in tensors.items():
        module = model.get_submodule(name)
        for attr, value in entry.items():
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))


def smoothed_weight(module: nn.Module, entry: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The [N, K] weight of a Linear / Conv1D after smoothing (``entry`` from :func:`fold`), or its own."""
    if entry is None:
        return linear_weight(module)
    return entry["weight"].t() if is_conv1d(module) else entry["weight"]
