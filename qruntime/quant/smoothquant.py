"""SmoothQuant for W8A8: move activation outliers into the weights, folded into the preceding norm.

Per-token INT8 activations lose the small channels of a row when a few channels are large (outliers).
For a group of Linear layers reading the same input X, SmoothQuant divides input channel j by

    s_j = max|X_j|^alpha / max_n |W[n, j]|^(1 - alpha)          (over the group's calibration inputs / weights)

and multiplies column j of every consumer's weight by s_j: X W^T = (X / s)(W * s)^T. The division is
folded into whatever produces X (a LayerNorm / RMSNorm's weight and bias, or the rows of a Linear), so
the float model computes the same function and the runtime pays nothing.

A fold is valid only where the producer's output reaches nothing but the group: pre-norm blocks (Llama
family: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up_proj -> down_proj; GPT-2:
ln_1 -> c_attn, ln_2 -> c_fc; Gemma 2/3's "sandwich" blocks: input_layernorm -> q/k/v,
pre_feedforward_layernorm -> gate/up, their post_attention_layernorm and post_feedforward_layernorm
normalize the sublayers' outputs on the way into the residual stream and feed no Linear). Post-norm
models (BERT) use the norm's output as the residual stream too, so their layers are left unsmoothed, and
every layer without a valid producer is listed with the reason.

A norm folds exactly when its output is normalize(x) * (offset + weight) (+ bias): the folded weight is
(offset + weight) / s - offset. Llama's RMSNorm and LayerNorm have offset 0; Gemma's RMSNorm multiplies
by (1 + weight), offset 1, so dividing its weight by s would not divide its output by s. The offset is
read off the norm's own forward on a probe input (:func:`norm_offset`); a norm of any other form, or
whose folded weight its dtype cannot hold accurately (:func:`fold_error`), is not folded and its group is
listed with the reason.

alpha is one number for the model (0.5 by default), or searched per group ("auto"): the value of
:data:`ALPHA_GRID` with the smallest W8A8 output error on sample rows of the group's calibration inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qruntime.plumbing.layouts import SECOND_HALF, BlockLayout, block_layout
from qruntime.nn.modules import is_conv1d, linear_weight

__all__ = [
    "SmoothGroup", "find_groups", "smoothing_scales", "search_alpha", "fold", "plan_smoothing", "plan_groups",
    "apply", "norm_offset", "producer_offset", "folded_norm_weight", "fold_error",
    "fold_tolerance", "NORM_OFFSETS", "FOLD_RTOL", "MIN_SCALE", "MAX_SCALE",
]

MIN_SCALE, MAX_SCALE = 1e-5, 1e5


# Offsets of the norms whose fold is exact: output = normalize(x) * (offset + weight) (+ bias). 0: LayerNorm,
# Llama / T5 RMSNorm; 1: Gemma's zero-centred RMSNorm (also Qwen3-Next's).
NORM_OFFSETS = (0.0, 1.0)
# Largest relative error of a folded norm's per-channel multiplier, offset + weight', once weight' is
# stored in the norm's dtype. An offset-0 fold errs by one rounding of the dtype at most; an offset fold
# loses bits when (offset + weight) / s is small against the offset. Beyond max(FOLD_RTOL, 2 eps) the
# group is not folded.
FOLD_RTOL = 1e-4
_PROBE_RTOL = 1e-5  # a probed norm matches a form when its output is this close (float32, eps negligible)



@dataclass
class SmoothGroup:
    producer: str  # module whose output is the consumers' input: a norm or a Linear
    consumers: list[str]  # Linear / Conv1D layers reading exactly that output
    scales: torch.Tensor | None = field(default=None, repr=False)  # float32 [K], once computed
    offset: float | None = None  # producer's output is normalize(x) * (offset + weight); None: probe it
    rows: str | None = None  # a Linear producer: None, all its output rows are divided; SECOND_HALF: the last half


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _probe_output(module: nn.Module, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    device = module.weight.device
    with torch.no_grad():
        y = torch.func.functional_call(module, {k: v.to(device) for k, v in params.items()}, (x.to(device),))
    return y.to(device="cpu", dtype=torch.float32)


def norm_offset(module: nn.Module) -> float | str:
    """The offset c (one of :data:`NORM_OFFSETS`) of a norm computing x / rms(x) * (c + weight) (+ bias),
    established by running its own forward (parameters swapped for float32 probes, the module untouched)
    on a probe input [4, K] with two probe weights; or the reason it cannot be folded exactly.
    ``nn.LayerNorm`` is known: offset 0 (its normalize subtracts the mean first)."""
    kind = type(module).__name__
    if isinstance(module, nn.LayerNorm):
        return 0.0 if module.weight is not None else "LayerNorm without a weight: nothing to fold into"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return f"{kind} has no 1-D weight to fold into"
    if weight.device.type == "meta":
        return f"{kind}'s weight is on the meta device: its form cannot be probed"
    gen, k = torch.Generator().manual_seed(0), weight.numel()
    x = torch.randn(4, k, generator=gen, dtype=torch.float64) * 32  # large: any eps is negligible
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True))).float()
    probes = [{"weight": torch.rand(k, generator=gen) + 0.5}, {"weight": torch.zeros(k)}]
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        probes[0]["bias"], probes[1]["bias"] = torch.randn(k, generator=gen), torch.zeros(k)
    try:
        outputs = [_probe_output(module, x.float(), p) for p in probes]
    except (RuntimeError, TypeError, ValueError) as err:
        return f"{kind}'s forward could not be probed ({type(err).__name__}: {err})"
    for c in NORM_OFFSETS:
        expected = [normed * (c + p["weight"]) + p.get("bias", 0.0) for p in probes]
        if all(y.shape == e.shape and float((y - e).norm() / normed.norm()) < _PROBE_RTOL
               for y, e in zip(outputs, expected)):
            return c
    return (f"{kind}'s output is not x / rms(x) * (offset + weight) (+ bias) for an offset in {NORM_OFFSETS} "
            "(probed on its forward): a fold would change the model")


def producer_offset(module: nn.Module) -> float | str:
    """0 for a Linear producer (its rows are divided), a norm's :func:`norm_offset`, or why neither."""
    return 0.0 if isinstance(module, nn.Linear) else norm_offset(module)


_NO_PRODUCER = "no foldable producer (its input comes from attention, an activation function or is shared)"


def _block_groups(prefix: str, block: nn.Module, layout: BlockLayout, targets: set[str],
                  groups: list[SmoothGroup], reasons: dict[str, str]) -> None:
    """Appends the block's foldable groups (consumers all in ``targets``) and the reasons for the rest."""
    if layout.refusal is not None:
        reasons.update({t: layout.refusal for t in targets if t.startswith(prefix)})
        return
    for part, why in layout.unfolded:
        reasons.update({t: why for t in targets if t.startswith(prefix + part)})
    for f in layout.folds:
        p = _get(block, f.producer)
        names = [prefix + c for c in f.consumers if _get(block, c) is not None]
        if p is None or not names or not all(n in targets for n in names):
            continue
        offset = producer_offset(p)
        if f.rows is not None and not isinstance(p, nn.Linear):
            offset = f"{type(p).__name__} is not a Linear: a slice of its outputs cannot be divided"
        if isinstance(offset, str):
            reasons.update({n: f"producer {prefix + f.producer} not folded: {offset}" for n in names})
        else:
            groups.append(SmoothGroup(prefix + f.producer, names, offset=offset, rows=f.rows))


def find_groups(model: nn.Module, targets: set[str]) -> tuple[list[SmoothGroup], dict[str, str]]:
    """The foldable groups whose consumers are all in ``targets`` (with their producer's offset), by the
    block layouts of :mod:`qruntime.plumbing.layouts`, and for every other target the reason it is not smoothed."""
    groups: list[SmoothGroup] = []
    reasons: dict[str, str] = {}
    config = getattr(model, "config", None)
    default = _NO_PRODUCER
    for name, block in model.named_modules():
        layout = block_layout(block, config)
        if layout is not None:
            _block_groups(f"{name}." if name else "", block, layout, targets, groups, reasons)
            if layout.refusal and layout.refusal.startswith("post-norm"):  # so is the pooler's / head's input
                default = layout.refusal
    smoothed = {c for g in groups for c in g.consumers}
    return groups, {t: reasons.get(t, default) for t in sorted(targets) if t not in smoothed}


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s [K] = absmax_X^alpha / absmax_W^(1 - alpha), clamped; 1 where a channel never fired."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).to(torch.float32) for w in weights]).amax(dim=0)
    a = act_absmax.to(torch.float32)
    s = a.pow(alpha) / w_absmax.clamp_min(1e-12).pow(1 - alpha)
    s = torch.where((a > 0) & (w_absmax > 0), s, torch.ones_like(s))
    return s.clamp(MIN_SCALE, MAX_SCALE)


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def w8a8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """Relative output error of W8A8 on sample inputs ``x`` [R, K] for the group's weights smoothed by
    ``s``: || X W^T - deq(Q_token(X / s)) deq(Q_channel(W * s))^T || / || X W^T || over all weights."""
    from qruntime.formats.packing import quantize_int8_per_channel
    from qruntime.ops.reference import quantize_per_token

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


def folded_norm_weight(weight: torch.Tensor, offset: float, scales: torch.Tensor) -> torch.Tensor:
    """w' = (offset + weight) / s - offset [K], computed in float64 and stored in ``weight``'s dtype: the
    norm's output x_normed * (offset + w') is its old output divided by s."""
    s = scales.to(device=weight.device, dtype=torch.float64)
    return ((offset + weight.detach().to(torch.float64)) / s - offset).to(weight.dtype)


def fold_error(weight: torch.Tensor, offset: float, scales: torch.Tensor) -> float:
    """Worst relative error, over the K channels, of a folded norm's multiplier offset + w' (w' as
    :func:`folded_norm_weight` stores it) against the exact (offset + weight) / s; inf on overflow."""
    s = scales.to(device=weight.device, dtype=torch.float64)
    exact = (offset + weight.detach().to(torch.float64)) / s
    diff = (offset + folded_norm_weight(weight, offset, scales).to(torch.float64) - exact).abs()
    err = torch.where(exact == 0, diff, diff / exact.abs())
    return float(err.nan_to_num(nan=math.inf).max())


def fold_tolerance(dtype: torch.dtype) -> float:
    """The :func:`fold_error` a norm of ``dtype`` may have: max(FOLD_RTOL, 2 eps of the dtype)."""
    return max(FOLD_RTOL, 2 * torch.finfo(dtype).eps)


def _offset_of(group: SmoothGroup, module: nn.Module) -> float:
    offset = group.offset if group.offset is not None else producer_offset(module)
    if isinstance(offset, str):
        raise ValueError(f"fold: producer {group.producer} cannot be folded exactly: {offset}")
    return offset


def _fold_refusal(model: nn.Module, group: SmoothGroup) -> str | None:
    """Why the group's producer norm cannot hold its folded weight accurately in its dtype, or None."""
    module = model.get_submodule(group.producer)
    if isinstance(module, nn.Linear):
        return None
    weight, offset = module.weight, _offset_of(group, module)
    err, tol = fold_error(weight, offset, group.scales), fold_tolerance(weight.dtype)
    if err <= tol:
        return None
    return (f"producer {group.producer} not folded: its folded weight (offset {offset:g}) would be off by "
            f"{err:.3g} relative in {weight.dtype}, over the {tol:.3g} allowed "
            f"(scale_max {float(group.scales.max()):.3g})")


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
            inv = _row_divisors(inv, entry["weight"].shape[0], group.rows)
            entry["weight"] = (entry["weight"].float() * inv[:, None]).to(entry["weight"].dtype)
        else:  # norm: x_normed * (offset + w) / s = x_normed * (offset + w'), and its bias / s
            entry["weight"] = folded_norm_weight(entry["weight"], _offset_of(group, module), s)
        if "bias" in entry:
            entry["bias"] = (entry["bias"].float() * inv).to(entry["bias"].dtype)
    return new


def _row_divisors(inv: torch.Tensor, rows: int, part: str | None) -> torch.Tensor:
    """1 / s for the producer's output rows that feed the group, 1 for the others (a fused [gate; up]
    Linear feeds its consumer through the up half only)."""
    if part is None:
        return inv
    if part != SECOND_HALF or rows != 2 * inv.numel():
        raise ValueError(f"fold: a {part} producer slice needs {2 * inv.numel()} output rows, it has {rows}")
    return torch.cat([torch.ones_like(inv), inv])


def as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A throw-away nn.Linear holding ``weight`` [N, K] (a smoothed weight to quantize)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def plan_smoothing(model, targets: dict[str, nn.Module], absmax: dict[str, torch.Tensor], alpha: float, hessians,
                   check=None):
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

    return plan_groups(model, targets, hessians, choose, {"method": "smoothquant", "alpha": alpha}, check)


def plan_groups(model, targets: dict[str, nn.Module], hessians, choose, header: dict, check=None):
    """Shared by SmoothQuant and AWQ: for every foldable group of ``targets`` (:func:`find_groups`),
    ``choose(group, weights)`` sets ``group.scales`` and returns its report entry, or returns the reason
    it is left alone. Returns the folded tensors (:func:`fold`; the model is not touched) and the report
    (``header`` + groups, layers not scaled with reasons, and the consumers with their alpha). The
    Hessians of scaled layers are rescaled in place to the scaled inputs: X' = X / s.

    ``check(tensors)``, when given, tests the folded tensors on the float model before they are kept:
    it returns ``(report entry, None)`` when the model is unchanged, or ``(report entry, reason)``, and
    then no group is folded (a block layout assumed wrongly) and every consumer gets the reason."""
    groups, not_smoothed = find_groups(model, set(targets))
    entries = []
    for group in groups:
        entry = choose(group, [linear_weight(targets[c]) for c in group.consumers])
        if not isinstance(entry, str):
            entry = _fold_refusal(model, group) or entry
        if isinstance(entry, str):
            group.scales = None
            for c in group.consumers:
                not_smoothed[c] = entry
            continue
        entries.append({"producer": group.producer, "consumers": group.consumers} | entry
                       | {"scale_min": float(group.scales.min()), "scale_max": float(group.scales.max())})
    groups = [g for g in groups if g.scales is not None]
    with torch.no_grad():
        tensors = fold(model, groups)
    if check is not None and tensors:
        header = dict(header)
        header["float_check"], refusal = check(tensors)
        if refusal is not None:
            not_smoothed.update({c: refusal for g in groups for c in g.consumers})
            groups, entries, tensors = [], [], {}
    for group in groups:  # X' = X / s: H' = diag(1/s) H diag(1/s)
        inv = (1.0 / group.scales).to(torch.float64)
        for c in group.consumers:
            if c in hessians:
                h, rows = hessians[c]
                hessians[c] = (h * inv.to(h.device)[:, None] * inv.to(h.device)[None, :], rows)
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
