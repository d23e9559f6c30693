"""What `compress()` did, as data: per-layer format, bytes and error; every weight left as it was (skipped
Linear layers, fused MoE experts, routers) with its reason and bytes; totals with and without them."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerReport:
    name: str
    kind: str  # "Linear" or "Conv1D"
    in_features: int
    out_features: int
    format: str
    bytes_before: int  # the float weight
    bytes_after: int  # packed weight + scales + zero points
    rel_error: float  # ||W - dequant(Q)||_F / ||W||_F
    sqnr_db: float  # 20 log10(||W|| / ||W - dequant(Q)||)
    method: str = "rtn"  # how the codes were chosen, e.g. "gptq (8192 calibration rows)"
    # ||X (W - Q)^T|| / ||X W^T|| on the calibration inputs X: the layer's own output error, a measure
    # of its sensitivity (None without calibration data)
    output_rel_error: float | None = None
    sparsity: float | None = None  # 2:4 layers: fraction of the weights that are zero
    # accuracy budget: the estimated increase of the mean next-token loss (nats/token) if this layer
    # alone is in the recipe's format (qruntime.quant.budget.fisher_sensitivity)
    sensitivity: float | None = None


@dataclass
class SkippedLayer:
    """A weight that ``compress()`` left as it was, and why. ``name`` is the module's name for a Linear /
    Conv1D layer, the parameter's full name for any other weight tensor (a fused 3-D MoE expert tensor
    ``...mlp.experts.gate_up_proj``, a bare router weight ``...mlp.gate.weight``, a convolution)."""

    name: str
    kind: str  # "Linear", "Conv1D", "QuantLinear", ..., or the owning module's class ("MixtralExperts")
    reason: str
    # bytes of the weight as it stays (float, or packed if it was already); 0 for a tensor shared with an
    # entry listed before it (counted once)
    nbytes: int = 0
    shape: list[int] = field(default_factory=list)  # as stored; [] when unknown
    dtype: str = ""  # "float32", ..., or the packed format of an already quantized layer

    @classmethod
    def of_tensor(cls, name: str, kind: str, reason: str, tensor) -> "SkippedLayer":
        """An entry for ``tensor`` (any torch tensor, meta included) kept as it is."""
        return cls(name, kind, reason, tensor.numel() * tensor.element_size(), list(tensor.shape),
                   str(tensor.dtype).removeprefix("torch."))

    def describe(self) -> str:
        """``4x256x64 float32, 256.0 KiB`` (shape, dtype, bytes), or ``""`` when the entry has no tensor."""
        if not self.shape:
            return ""
        return f"{'x'.join(map(str, self.shape))} {self.dtype}, {format_bytes(self.nbytes)}"


@dataclass
class CompressReport:
    config: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_bytes_before: int = 0  # all parameters and buffers
    model_bytes_after: int = 0
    seconds: float = 0.0
    cpu_backend: str = ""
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage ("calibration", ...)
    # calibrated recipes: {"batches", "tokens", "sha256"} of the data. compress() draws no random
    # numbers (windows are consecutive, GPTQ's order is by the Hessian), so there is no seed to record:
    # the same model, recipe and data give bit-identical weights on the same machine and thread count.
    calibration: dict = field(default_factory=dict)
    # SmoothQuant (w8a8-sq) or AWQ (-awq): {"method": "smoothquant" | "awq", "alpha" (a number or "auto"),
    # "groups": [{"producer", "consumers", "alpha", "scale_min", "scale_max", and with a search the error
    # per alpha tried: "sample_error" (SmoothQuant), "output_error" (AWQ)}], "not_smoothed": [{"layer", "reason"}]}
    smoothing: dict = field(default_factory=dict)
    # depth stage (d<N>+...): qruntime.distill.DistillReport.to_dict(): teacher/student depth, kept
    # blocks and their selection, steps, tokens, seconds, held-out metrics before/after
    distillation: dict = field(default_factory=dict)
    # 2:4 recovery stage (2:4-kd+...): the DistillReport of the masked fine-tune against the original
    recovery: dict = field(default_factory=dict)
    # accuracy budget (max_ppl_increase, qruntime.quant.budget): {"max_ppl_increase", "reference_perplexity",
    # "perplexity", "perplexity_ratio", "met", "promoted" (most sensitive first), "layers", "trials":
    # [{"promoted", "perplexity"}], "batches", "fallback", "data"}
    budget: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressReport":
        """The inverse of :meth:`to_dict` (derived totals are recomputed, unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        layer_names = {f.name for f in fields(LayerReport)}
        kw["layers"] = [LayerReport(**{k: v for k, v in l.items() if k in layer_names}) for l in d.get("layers", [])]
        skipped_names = {f.name for f in fields(SkippedLayer)}
        kw["skipped"] = [SkippedLayer(**{k: v for k, v in s.items() if k in skipped_names}) for s in d.get("skipped", [])]
        return cls(**kw)

    @property
    def weight_bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def weight_bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    @property
    def weight_compression(self) -> float:
        """How many times smaller the converted layers' weights became (see :attr:`total_compression`
        for all weight matrices, those left in float included)."""
        return self.weight_bytes_before / max(1, self.weight_bytes_after)

    @property
    def skipped_bytes(self) -> int:
        """Bytes of the weights left as they were (``skipped``), each shared tensor counted once."""
        return sum(s.nbytes for s in self.skipped)

    @property
    def total_weight_bytes_before(self) -> int:
        """Every weight matrix of the model (converted or skipped; embedding tables only when converted)."""
        return self.weight_bytes_before + self.skipped_bytes

    @property
    def total_weight_bytes_after(self) -> int:
        return self.weight_bytes_after + self.skipped_bytes

    @property
    def total_compression(self) -> float:
        """How many times smaller all weight matrices became: 1.0 when most of them stayed in float."""
        return self.total_weight_bytes_before / max(1, self.total_weight_bytes_after)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            weight_bytes_before=self.weight_bytes_before,
            weight_bytes_after=self.weight_bytes_after,
            weight_compression=self.weight_compression,
            skipped_bytes=self.skipped_bytes,
            total_weight_bytes_before=self.total_weight_bytes_before,
            total_weight_bytes_after=self.total_weight_bytes_after,
            total_compression=self.total_compression,
        )
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, max_layers: int | None = 12) -> str:
        """A plain-text table: the converted layers (first ``max_layers``), skipped ones, totals.

        "rel err" is the weight's relative Frobenius error, "out err" the layer's relative output error
        on the calibration inputs (calibrated recipes only): the larger, the more sensitive the layer."""
        lines = [f"qruntime.compress: {self.config}  ({len(self.layers)} layers converted, {len(self.skipped)} skipped, {self.seconds:.1f} s, CPU backend: {self.cpu_backend})"]
        header = f"{'layer':<44} {'kind':<7} {'shape (N x K)':>14} {'format':<24} {'KiB before':>11} {'KiB after':>10} {'rel err':>9} {'SQNR dB':>8} {'out err':>9} {'zeros':>6}"
        lines += [header, "-" * len(header)]
        shown = self.layers if max_layers is None else self.layers[:max_layers]
        for l in shown:
            shape = f"{l.out_features}x{l.in_features}"
            lines.append(
                f"{l.name[-44:]:<44} {l.kind:<7} {shape:>14} {l.format:<24} {l.bytes_before / 1024:>11.1f} "
                f"{l.bytes_after / 1024:>10.1f} {l.rel_error:>9.2e} {l.sqnr_db:>8.1f} "
                + (f"{l.output_rel_error:>9.2e}" if l.output_rel_error is not None else f"{'-':>9}")
                + (f" {l.sparsity:>6.1%}" if l.sparsity is not None else f" {'-':>6}")
            )
        if len(shown) < len(self.layers):
            lines.append(f"... {len(self.layers) - len(shown)} more converted layers (report.to_json() lists all)")
        fallbacks = [l.name for l in self.layers if "never reached" in l.method]
        if fallbacks:
            lines.append(f"round-to-nearest fallback (no calibration data reached them): {', '.join(fallbacks)}")
        lines += self._skipped_lines(max_layers)
        if self.stages:
            lines.append("time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.stages.items()))
        if self.smoothing:
            sm = self.smoothing
            alphas = sorted({g.get("alpha") for g in sm.get("groups", [])} - {None})
            lines.append(f"{sm.get('method', 'smoothquant')} alpha {sm.get('alpha')} (used: {', '.join(f'{a:g}' for a in alphas) or '-'}): "
                         f"{len(sm.get('groups', []))} groups folded into "
                         f"their producers; {len(sm.get('not_smoothed', []))} layers not scaled "
                         + (f"(e.g. {sm['not_smoothed'][0]['layer']}: {sm['not_smoothed'][0]['reason']})"
                            if sm.get("not_smoothed") else ""))
        if self.distillation:
            lines.append(_distill_line("distillation", self.distillation))
        if self.recovery:
            lines.append(_distill_line("2:4 recovery (masks fixed)", self.recovery))
        if self.budget:
            b = self.budget
            lines.append(
                f"accuracy budget: perplexity x{b['perplexity_ratio']:.4f} of the original's (limit "
                f"x{1 + b['max_ppl_increase']:g}, {'met' if b['met'] else 'NOT met'}) on {b['batches']} batches of "
                f"{b['data']}; {len(b['promoted'])} of {b['layers']} layers in {b['fallback']}, "
                f"{len(b['trials'])} measurements")
        if self.calibration:
            c = self.calibration
            lines.append(f"calibration data: {c.get('batches')} batches, {c.get('tokens')} tokens, "
                         f"sha256 {str(c.get('sha256', ''))[:16]}"
                         + (f"; forwards in {c['precision']}" if c.get("precision", "model") != "model" else ""))
            if "tuned_blocks" in c:
                tuned = c["tuned_blocks"]
                kept = [t for t in tuned if t["kept"]]
                what = {"kept weights": "kept-weight tuning", "scales and codes": "scale and rounding tuning"}.get(
                    c.get("tuned"), "scale tuning")
                if tuned:
                    lines.append(f"{what}: kept in {len(kept)} of {len(tuned)} blocks; block output error "
                                 f"{sum(t['error_before'] for t in tuned) / len(tuned):.3g} -> "
                                 f"{sum(t['error_after'] for t in tuned) / len(tuned):.3g} "
                                 "(mean relative MSE on held-out calibration windows)")
                else:
                    lines.append(f"{what}: not run (it needs the block-by-block pass; calibration was "
                                 f"{c.get('mode')})")
        lines.append(
            f"converted weights: {self.weight_bytes_before / 2**20:.2f} MiB -> {self.weight_bytes_after / 2**20:.2f} MiB "
            f"({self.weight_compression:.2f}x); all weight matrices (skipped ones as they are): "
            f"{self.total_weight_bytes_before / 2**20:.2f} MiB -> {self.total_weight_bytes_after / 2**20:.2f} MiB "
            f"({self.total_compression:.2f}x); whole model: {self.model_bytes_before / 2**20:.2f} MiB -> "
            f"{self.model_bytes_after / 2**20:.2f} MiB"
        )
        return "\n".join(lines)

    def _skipped_lines(self, max_lines: int | None) -> list[str]:
        """One line per skipped weight (the first ``max_lines``), then their bytes by kind."""
        shown = self.skipped if max_lines is None else self.skipped[:max_lines]
        lines = [f"skipped {s.name} ({s.kind}{', ' + s.describe() if s.shape else ''}): {s.reason}" for s in shown]
        if len(shown) < len(self.skipped):
            lines.append(f"... {len(self.skipped) - len(shown)} more skipped (report.to_json() lists all)")
        if self.skipped_bytes:
            by_kind: dict[str, list[int]] = {}
            for s in self.skipped:
                count_bytes = by_kind.setdefault(s.kind, [0, 0])
                count_bytes[0] += 1
                count_bytes[1] += s.nbytes
            share = self.skipped_bytes / max(1, self.total_weight_bytes_before)
            lines.append(
                f"not converted (left as they are): {format_bytes(self.skipped_bytes)} in {len(self.skipped)} weights, "
                f"{share:.0%} of the weight bytes"
                + (" (most of the model's weights are NOT compressed)" if share > 0.5 else "") + ": "
                + ", ".join(f"{kind} {format_bytes(b)} ({n})" for kind, (n, b) in by_kind.items()))
        return lines

    def __str__(self) -> str:
        return self.table()


def format_bytes(nbytes: int) -> str:
    """``512 B``, ``12.5 KiB``, ``3.25 MiB`` or ``1.50 GiB``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    if nbytes < 2**20:
        return f"{nbytes / 1024:.1f} KiB"
    return f"{nbytes / 2**20:.2f} MiB" if nbytes < 2**30 else f"{nbytes / 2**30:.2f} GiB"


def _distill_line(label: str, d: dict) -> str:
    """One line of a DistillReport dict: depth, kept blocks, steps, tokens, time, held-out metric."""
    sel = d.get("selection") or {}
    before, after = d.get("before") or {}, d.get("after") or {}
    metric = next((k for k in ("perplexity", "cosine", "kl") if k in after), None)
    depth = f"{d.get('teacher_layers')} -> {d.get('student_layers')} blocks"
    if d.get("teacher_layers") != d.get("student_layers") or sel:
        depth += f" (kept {d.get('kept_layers')}, selection {sel.get('method', 'given')})"
    return (
        f"{label}: {depth}, {d.get('steps')} steps, {d.get('tokens')} tokens, {d.get('seconds', 0):.1f} s"
        + (f"; held-out {metric}: teacher {d['teacher'][metric]:.4g}, " if metric in (d.get("teacher") or {}) else
           (f"; held-out {metric}: " if metric else ""))
        + (f"student {before[metric]:.4g} -> {after[metric]:.4g}" if metric else "")
    )
