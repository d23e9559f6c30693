"""`qruntime.compress`: the stages of a compression, run in order on one :class:`CompressState`.

Each stage is one function ``stage(state) -> None`` that reads what the stages before it left in the
state and adds its own results (:data:`STAGES` lists them in order): the depth stage, target selection,
the calibration passes (statistics, SmoothQuant / AWQ plans, 2:4 pruning and GPTQ block by block),
one-pass pruning and recovery, per-layer quantization, embeddings, the accuracy budget, the swap and the
report. Nothing is changed in the caller's model before the swap, so a stage that raises leaves the model
as it was.
"""
from __future__ import annotations

import copy
import fnmatch
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from qruntime.calibration.stats import calibration_inputs, collect_stats, forward_dtype
from qruntime.distill.trainer import distill as run_distill
from qruntime.nn.modules import QuantEmbedding, QuantLinear, is_conv1d, linear_weight
from qruntime.nn.targets import (layer_kind, model_bytes, module_name, output_error, raise_no_targets, select_targets,
                                 skipped_layer, validate_target, weight_error)
from qruntime.ops.registry import cpu_backend
from qruntime.plumbing.offload import check_device, home_device, onloaded
from qruntime.plumbing.report import CompressReport, LayerReport, SkippedLayer
from qruntime.quant.awq import plan_awq
from qruntime.quant.config import QuantConfig
from qruntime.quant.linear import quantize_linear, quantize_linear_unrounded
from qruntime.quant.smoothquant import apply as apply_smoothing
from qruntime.quant.smoothquant import as_linear, plan_smoothing, smoothed_weight
from qruntime.recipes.config import CompressConfig, data_free_variant
from qruntime.recipes.presets import resolve_config
from qruntime.sparse.pack import pack_pruned
from qruntime.sparse.prune import prune_weight

__all__ = ["compress", "CompressState", "STAGES", "fold_check"]


@dataclass
class CompressState:
    """Everything one ``compress()`` call knows: its inputs, then what each stage found or built."""

    model: nn.Module
    cfg: CompressConfig
    calib_data: list | None
    train_data: Iterable | None
    eval_data: list | None
    inplace: bool
    progress: bool
    device: torch.device | None
    calib_precision: str
    precision: torch.dtype | None  # of the calibration forwards (None: the model's own)
    start: float = field(default_factory=time.perf_counter)
    bytes_before: int = 0  # with a depth stage: the teacher's
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, for the report
    distillation: dict = field(default_factory=dict)
    targets: list[tuple[str, nn.Module]] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    sparse: set[str] = field(default_factory=set)  # the 2:4 targets
    dense_note: dict[str, str] = field(default_factory=dict)  # target -> why it stays dense, for the report
    calibration: dict = field(default_factory=dict)  # the report's calibration fingerprint
    hessians: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # (X^T X / rows or its diagonal, rows)
    smoothed: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # module -> its folded tensors
    smoothing: dict = field(default_factory=dict)
    prebuilt: dict[str, nn.Module] = field(default_factory=dict)  # layers quantized block by block
    output_errors: dict[str, float] = field(default_factory=dict)  # their output errors, measured there
    pruned: dict[str, torch.Tensor] = field(default_factory=dict)  # 2:4 target -> pruned weight [N, K] (float64)
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # with recovery: the weights before it
    recovery: dict = field(default_factory=dict)
    quantize_start: float = 0.0
    replacements: list[tuple[str, nn.Module]] = field(default_factory=list)
    layers: list[LayerReport] = field(default_factory=list)
    budget: dict = field(default_factory=dict)

    @property
    def quant_hessians(self) -> bool:
        """The quantizer needs calibration statistics (GPTQ, activation-aware clipping)."""
        return self.cfg.quant is not None and self.cfg.quant.needs_calibration

    @property
    def sequential(self) -> bool:
        """GPTQ / clipping block by block, each block on the outputs of the quantized blocks before it
        (QuantConfig.sequential; 2:4 recipes have their own block-by-block pass)."""
        return self.quant_hessians and self.cfg.quant.sequential and self.cfg.sparsity is None

    def timed(self, stage: str, t0: float) -> None:
        self.stages[stage] = time.perf_counter() - t0


def compress(
    model: nn.Module,
    config: CompressConfig | QuantConfig | str | None = "w8a16",
    calib_data: Iterable | None = None,
    *,
    train_data: Iterable | None = None,
    eval_data: Iterable | None = None,
    inplace: bool = True,
    progress: bool = True,
    max_ppl_increase: float | None = None,
    device: torch.device | str | None = None,
    calib_precision: str = "auto",
) -> tuple[nn.Module, CompressReport]:
    """Quantizes the Linear and Conv1D layers of a (HuggingFace) model, after an optional depth stage
    (a shallower student distilled from it).

    Args:
        model: any ``nn.Module``; HF BERT, GPT-2 (Conv1D), Llama-family and others (``docs/models.md``).
        config: a recipe name (``"w8a16"``, ``"w4a16-g128"``, ``docs/recipes.md``), a
            :class:`QuantConfig` or a :class:`CompressConfig`.
        calib_data: for calibrated recipes (GPTQ: ``w4a16-g128`` and ``*-gptq``; SmoothQuant: ``w8a8``;
            ``-clip``, ``-awq``, ``-tune``, budgets, ``2:4``): an iterable of input-id tensors [batch, seq]
            or of dicts of model keyword arguments (a tokenized ``datasets.Dataset`` works: its lists of ids
            become tensors), e.g.
            ``qruntime.eval.data.calibration_batches(tokenizer)``. Ignored by round-to-nearest. With a
            depth stage, the student is calibrated on it after distillation.
        train_data: for a depth stage (``"d20+..."``, ``CompressConfig(distill=...)``): the batches the
            student is distilled on (see :func:`qruntime.distill`), e.g.
            ``qruntime.eval.data.calibration_batches(tokenizer, 64, 256, split="train")``.
        eval_data: held-out batches to measure the student before and after distillation, and the
            perplexity of the accuracy budget (optional; the budget uses the calibration data without it).
        inplace: swap the layers in ``model``; with False a deep copy is compressed and ``model`` is
            left untouched. With a depth stage the result is always a new model (the student) and
            ``model`` (the teacher) is left untouched.
        progress: show a progress bar.
        max_ppl_increase: an accuracy budget (overrides the recipe's, see :mod:`qruntime.quant.budget`): e.g.
            0.02 keeps the most sensitive layers in INT8 until the measured perplexity is within 2% of
            the original's.
        device: where the calibration passes run (Hessians, block-by-block GPTQ / SparseGPT / Wanda and
            block tuning, the AWQ / SmoothQuant statistics), e.g. ``"cuda"`` for a model in CPU RAM that
            does not fit on the GPU: the model stays where it is and each block (and each other module
            with weights) is moved to ``device`` only while it runs (:mod:`qruntime.plumbing.offload`); the
            compressed layers end up where the model is. ``None``: where the model is. A depth stage,
            a 2:4 recovery stage and the accuracy budget run where the model is.
        calib_precision: the precision of the calibration forwards' matmuls (and of X^T X) for a float32
            model: ``"auto"`` (default): bfloat16 under ``torch.autocast`` where the calibration device
            multiplies bf16 in hardware (CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX), else float32;
            ``"bfloat16"``: always; ``"model"``: the model's own dtype (float32: several times slower on
            such CPUs). Norms, the residual stream, the Hessian sums and GPTQ's solves stay in float32 /
            float64; block tuning runs under the same autocast (its parameters, loss and optimizer in
            float32); a depth stage, a recovery stage and the accuracy budget are not affected. The
            report's calibration says which ran (:func:`qruntime.calibration.stats.forward_dtype`).

    Returns:
        ``(model, report)``. ``report.skipped`` lists every weight left as it was with its reason and
        bytes, non-Linear ones included (fused 3-D MoE experts, bare router weights: not quantized), and
        ``report.total_weight_bytes_before/after`` count them. On any error the caller's model is left
        exactly as it was: every layer is checked and quantized before the first one is swapped in.
    """
    state = new_state(model, config, train_data=train_data, eval_data=eval_data, inplace=inplace,
                      progress=progress, max_ppl_increase=max_ppl_increase, device=device,
                      calib_precision=calib_precision)
    state.calib_data = calib_data
    for stage in STAGES:
        stage(state)
    return state.model, build_report(state)


def new_state(model, config, *, train_data, eval_data, inplace, progress, max_ppl_increase, device,
              calib_precision) -> CompressState:
    """The state of a new compression, its arguments checked (the stage that validates them)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    cfg = resolve_config(config)
    if device is not None:
        device = check_device(device)
    precision = forward_dtype(model, calib_precision, device)  # checks calib_precision first
    if max_ppl_increase is not None:
        cfg = replace(cfg, max_ppl_increase=max_ppl_increase)
    if eval_data is not None and not isinstance(eval_data, (list, tuple)):
        eval_data = list(eval_data)  # read by the depth stage and the budget
    return CompressState(model=model, cfg=cfg, calib_data=None, train_data=train_data, eval_data=eval_data,
                         inplace=inplace, progress=progress, device=device, calib_precision=calib_precision,
                         precision=precision, bytes_before=model_bytes(model))


def distill_stage(s: CompressState) -> None:
    """The depth stage (``d<N>+``): the student distilled from the model replaces it from here on."""
    if s.cfg.distill is None:
        return
    if s.train_data is None:
        raise ValueError(
            f"recipe {s.cfg.name!r} has a depth stage and needs train_data: batches of input ids to distill "
            "the student on, e.g. qruntime.eval.data.calibration_batches(tokenizer, 64, 256, split='train')"
        )
    t0 = time.perf_counter()
    s.model, distill_report = run_distill(s.model, None, s.train_data, s.cfg.distill, eval_data=s.eval_data,
                                          progress=s.progress)
    s.timed("distillation", t0)
    s.distillation = distill_report.to_dict()
    s.inplace = True  # the student is already a new model


def select_stage(s: CompressState) -> None:
    """The targets (each checked), the layers left alone with their reasons, and the 2:4 targets among
    them; then the calibration data the recipe needs."""
    s.targets, s.skipped = select_targets(s.model, s.cfg)
    if not s.targets:
        raise_no_targets(s.model, s.cfg, s.skipped)
    for name, module in s.targets:
        validate_target(name, module)
    sp = s.cfg.sparsity
    if sp is not None and sp.recover is not None and s.train_data is None:
        raise ValueError(
            f"recipe {s.cfg.name!r} has a recovery stage and needs train_data: batches of input ids to distill "
            "the pruned model on, e.g. qruntime.eval.data.calibration_batches(tokenizer, 64, 256, split='train')"
        )
    if sp is not None:
        _split_sparse(s)
    if s.cfg.needs_calibration:
        if s.calib_data is None:
            free = data_free_variant(s.cfg)
            hint = f" (or the data-free {free.name!r})" if free is not None else ""
            raise ValueError(
                f"recipe {s.cfg.name!r} needs calib_data: an iterable of input-id tensors or dicts of model "
                f"inputs, e.g. qruntime.eval.data.calibration_batches(tokenizer){hint}"
            )
        s.calib_data = s.calib_data if isinstance(s.calib_data, (list, tuple)) else list(s.calib_data)


def _split_sparse(s: CompressState) -> None:
    """The 2:4 targets, and those a sparsity skip pattern keeps dense (quantized, or left alone)."""
    sp = s.cfg.sparsity
    kept_targets = []
    for name, module in s.targets:
        hit = next((p for p in sp.skip if fnmatch.fnmatchcase(name, p)), None)
        if hit is None:
            s.sparse.add(name)
        elif s.cfg.quant is None:
            s.skipped.append(skipped_layer(name, module, f"matches sparsity skip pattern {hit!r} (kept dense)"))
            continue
        else:
            s.dense_note[name] = f" (dense: matches sparsity skip pattern {hit!r})"
        kept_targets.append((name, module))
    s.targets = kept_targets
    if not s.targets:
        raise ValueError(f"sparsity skip={list(sp.skip)} leaves no layer of {type(s.model).__name__} to compress")


def calibrate_stage(s: CompressState) -> None:
    """The calibration passes (inside :func:`qruntime.plumbing.offload.onloaded`): 2:4 pruning block by block, or
    one pass of statistics with the SmoothQuant / AWQ scale plans; then GPTQ block by block."""
    cfg, sp = s.cfg, s.cfg.sparsity
    with onloaded(s.model, s.device if cfg.needs_calibration else None):
        if sp is not None and sp.needs_calibration and sp.sequential:
            t0 = time.perf_counter()
            s.hessians = _prune_blockwise(s)
            s.timed("calibration + pruning (block by block)", t0)
        elif cfg.needs_calibration and not (s.sequential and cfg.smoothquant is None and not cfg.awq):
            _statistics_and_scales(s)
        if s.sequential and s.calib_data is not None:
            t0 = time.perf_counter()
            s.hessians = _quantize_blockwise(s)
            s.timed("calibration + quantization (block by block)" if s.prebuilt else "calibration", t0)
    if cfg.needs_calibration:
        s.calibration["precision"] = f"{s.precision} matmuls (autocast)".replace("torch.", "") if s.precision else "model"
        if s.device is not None:
            s.calibration["device"] = str(s.device)


def _statistics_and_scales(s: CompressState) -> None:
    """One pass of calibration statistics, then the SmoothQuant or AWQ scales planned on them (their folds
    checked on the float model first, :func:`fold_check`)."""
    cfg, sp = s.cfg, s.cfg.sparsity
    t0 = time.perf_counter()
    s.hessians, absmax = collect_stats(s.model, dict(s.targets), s.calib_data,
                                       hessian=s.quant_hessians or cfg.awq or cfg.max_ppl_increase is not None
                                       or (sp is not None and sp.needs_calibration),
                                       absmax=cfg.smoothquant is not None,
                                       samples=1024 if cfg.smoothquant == "auto" else 0,
                                       progress=s.progress, fingerprint=s.calibration, precision=s.precision)
    s.timed("calibration", t0)
    check = fold_check(s.model, next(iter(s.calib_data)))
    if cfg.smoothquant is not None:
        s.smoothed, s.smoothing = plan_smoothing(s.model, dict(s.targets), absmax, cfg.smoothquant, s.hessians, check)
    elif cfg.awq:
        t0 = time.perf_counter()
        s.smoothed, s.smoothing = plan_awq(s.model, dict(s.targets), s.hessians, cfg.quant, check=check)
        s.timed("awq scale search", t0)


def prune_stage(s: CompressState) -> None:
    """2:4 pruning of the targets the block-by-block pass did not prune, then the recovery stage."""
    sp = s.cfg.sparsity
    if sp is None:
        return
    t0 = time.perf_counter()
    for name, module in tqdm([t for t in s.targets if t[0] in s.sparse and t[0] not in s.pruned],
                             desc=f"prune 2:4 {sp.method}", unit="layer", disable=not s.progress):
        hessian = s.hessians.get(name, (None, 0))[0]
        method = sp.method if hessian is not None or sp.method == "magnitude" else "magnitude"
        with torch.no_grad():
            s.pruned[name] = prune_weight(linear_weight(module), method, hessian, 2, 4, damp=sp.damp,
                                          block_size=sp.block_size)[0]
        if method != sp.method:
            s.dense_note[name] = " (magnitude: calibration data never reached this layer)"
    s.timed("pruning", t0)
    if sp.recover is not None:
        _recover(s)


def _recover(s: CompressState) -> None:
    """The 2:4 recovery stage: a copy of the model with the pruned weights, distilled from the model with
    the masks fixed, replaces it; ``pruned`` gets the trained weights (still exactly 2:4). GPTQ codes for
    them need the calibration statistics again."""
    # the report measures each layer against the original weights, not the trained ones
    s.originals = {name: smoothed_weight(module, None) for name, module in s.targets}
    t0 = time.perf_counter()
    student = copy.deepcopy(s.model)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in s.pruned:
            module = student.get_submodule(name)
            w = s.pruned[name].to(module.weight.dtype)
            module.weight.copy_(w.t() if is_conv1d(module) else w)
            masks[f"{name}.weight"] = (module.weight != 0).to(module.weight.dtype)
    student, report = run_distill(s.model, student, s.train_data, s.cfg.sparsity.recover, eval_data=s.eval_data,
                                  masks=masks, progress=s.progress)
    s.model, s.recovery = student, report.to_dict()
    s.targets = [(name, student.get_submodule(name)) for name, _ in s.targets]
    for name in s.pruned:
        s.pruned[name] = linear_weight(student.get_submodule(name)).detach().to(torch.float64)
    s.timed("recovery", t0)
    s.inplace = True  # the recovered model is a new model
    if s.quant_hessians:
        t0 = time.perf_counter()
        s.hessians = collect_stats(s.model, dict(s.targets), s.calib_data, progress=s.progress,
                                   precision=forward_dtype(s.model, s.calib_precision))[0]
        s.timed("calibration (recovered model)", t0)


def copy_stage(s: CompressState) -> None:
    """``inplace=False``: what follows works on a deep copy, and the caller's model stays untouched."""
    if not s.inplace:
        s.model = copy.deepcopy(s.model)
        s.targets = [(name, s.model.get_submodule(name)) for name, _ in s.targets]


def quantize_stage(s: CompressState) -> None:
    """Each target's compressed layer (built now, or during the block-by-block pass) and report entry."""
    s.quantize_start = time.perf_counter()
    cfg = s.cfg
    for name, module in tqdm(s.targets, desc=f"{'pack' if cfg.quant is None else 'quantize'} {cfg.name}",
                             unit="layer", disable=not s.progress):
        q, layer = _compress_layer(s, name, module)
        s.replacements.append((name, q))
        s.layers.append(layer)


def _compress_layer(s: CompressState, name: str, module: nn.Module) -> tuple[nn.Module, LayerReport]:
    cfg = s.cfg
    weight = s.originals[name] if name in s.originals else smoothed_weight(module, s.smoothed.get(name))
    hessian, rows = s.hessians.get(name, (None, 0))
    method = _method(cfg, name in s.sparse, hessian, rows) + s.dense_note.get(name, "")
    if name in s.smoothing.get("consumers", ()):
        method += f" + {s.smoothing['method']} (alpha {s.smoothing['alpha_of'][name]:g})"
    with torch.no_grad():
        if name in s.sparse:
            q = pack_pruned(s.pruned[name], module.bias, cfg.quant,
                            hessian if s.quant_hessians else None, dtype=weight.dtype)
        elif name in s.prebuilt:
            q = s.prebuilt[name]
        else:
            source = module if name not in s.smoothed else as_linear(weight, s.smoothed[name].get("bias"))
            q = quantize_linear(source, _layer_quant(cfg.quant, hessian), hessian=hessian)
        rel, sqnr = weight_error(weight, q)
        out_err = s.output_errors.get(name)
        if out_err is None and hessian is not None:
            out_err = output_error(weight, q, hessian)
    layer = LayerReport(
        name=name,
        kind=layer_kind(module),
        in_features=q.in_features,
        out_features=q.out_features,
        format=cfg.format_name if name in s.sparse else cfg.quant.name,
        bytes_before=weight.numel() * weight.element_size(),
        bytes_after=q.packed_bytes(),
        rel_error=rel,
        sqnr_db=sqnr,
        method=method,
        output_rel_error=out_err,
        sparsity=(s.pruned[name] == 0).double().mean().item() if name in s.sparse else None,
    )
    return q, layer


def _method(cfg: CompressConfig, sparse: bool, hessian: torch.Tensor | None, rows: int) -> str:
    """How a layer's weights were chosen, for the report: e.g. ``sparsegpt + gptq (8192 calibration rows)``."""
    parts = [cfg.sparsity.method] if sparse else []
    if cfg.quant is not None:
        clip = {"none": "", "mse": " + mse clipping", "act": " + activation-aware clipping"}[cfg.quant.clip]
        if cfg.quant.needs_calibration and hessian is None:
            clip = " + mse clipping" if clip else ""
            parts.append(f"rtn{clip} (calibration data never reached this layer)")
        else:
            parts.append(cfg.quant.method + clip)
    text = " + ".join(parts)
    return text + (f" ({rows} calibration rows)" if hessian is not None else "")


def _layer_quant(quant: QuantConfig, hessian: torch.Tensor | None) -> QuantConfig:
    """A layer no calibration data reached has no activations to weight its clipping: "mse" instead."""
    return replace(quant, clip="mse") if quant.clip == "act" and hessian is None else quant


def embeddings_stage(s: CompressState) -> None:
    """``-emb8`` / ``-emb4``: the input embedding (and an output head tied to it) packed too."""
    quant = s.cfg.embeddings
    if quant is None:
        return
    get_in = getattr(s.model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, nn.Embedding):
        found = type(emb).__name__ if emb is not None else "no get_input_embeddings()"
        s.skipped.append(SkippedLayer("<input embedding>", "Embedding",
                                      f"embeddings={quant.name} asked, but the model has {found}, not an nn.Embedding"))
        return
    name = module_name(s.model, emb)
    if not torch.isfinite(emb.weight).all():
        raise ValueError(f"embedding {name!r}: weight has NaN/Inf values; refusing to quantize")
    try:
        with torch.no_grad():
            q = QuantEmbedding.from_embedding(emb, quant.format)
    except ValueError as exc:
        s.skipped.append(SkippedLayer(name, type(emb).__name__, f"embeddings={quant.name} asked, but {exc}"))
        return
    with torch.no_grad():
        rel, sqnr = weight_error(emb.weight, q)
    s.replacements.append((name, q))
    nbytes = emb.weight.numel() * emb.weight.element_size()
    s.layers.append(LayerReport(name, "Embedding", q.embedding_dim, q.num_embeddings, quant.name, nbytes,
                                q.packed_bytes(), rel, sqnr, method="rtn"))
    get_out = getattr(s.model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        _tie_head(s, head, q, quant, name, (rel, sqnr))


def _tie_head(s: CompressState, head: nn.Linear, q: QuantEmbedding, quant: QuantConfig, emb_name: str,
              errors: tuple[float, float]) -> None:
    """An output head tied to the packed embedding shares its packed weight: no bytes of its own."""
    head_name = module_name(s.model, head)
    s.replacements[:] = [(n, m) for n, m in s.replacements if n != head_name]
    s.layers[:] = [l for l in s.layers if l.name != head_name]
    s.skipped[:] = [x for x in s.skipped if x.name != head_name]
    with torch.no_grad():
        s.replacements.append((head_name, QuantLinear.tied_to(q, head.bias)))
    s.layers.append(LayerReport(head_name, "Linear", q.embedding_dim, q.num_embeddings, quant.name, 0, 0, *errors,
                                method=f"tied to {emb_name} (shares its packed weight)"))


def budget_stage(s: CompressState) -> None:
    """The accuracy budget (:mod:`qruntime.quant.budget`): the most sensitive targets in the fallback format."""
    if s.cfg.max_ppl_increase is None:
        return
    t0 = time.perf_counter()
    batches, data_name = ((s.eval_data, "eval_data") if s.eval_data is not None
                          else (s.calib_data, "calibration data"))
    s.budget = _apply_budget(s, list(batches), data_name)
    s.timed("accuracy budget", t0)


def _format_bytes(module: nn.Module) -> int:
    """Bytes of a layer's weight as stored: packed (QuantLinear) or float."""
    if hasattr(module, "packed_bytes"):
        return module.packed_bytes()
    w = linear_weight(module)
    return w.numel() * w.element_size()


def _fallback_layers(s: CompressState, fallback: QuantConfig | None) -> dict[str, nn.Module]:
    """Each target in the budget's fallback format (INT8, or the float layer with its folds)."""
    high: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, module in s.targets:
            weight = s.originals[name] if name in s.originals else smoothed_weight(module, s.smoothed.get(name))
            source = module if name not in s.smoothed else as_linear(weight, s.smoothed[name].get("bias"))
            high[name] = quantize_linear(source, fallback) if fallback is not None else source
    return high


def _apply_budget(s: CompressState, batches: list, data_name: str) -> dict:
    """Measures which targets need the fallback format and rewrites ``replacements``, ``layers`` and
    ``skipped`` for them. Returns the report entry."""
    from qruntime.quant.budget import budget_search, fisher_sensitivity

    target_names = {name for name, _ in s.targets}
    fallback = QuantConfig(bits=8) if s.cfg.fallback == "w8a16" else None
    high = _fallback_layers(s, fallback)
    low = {name: q for name, q in s.replacements if name in target_names}
    fixed = {name: q for name, q in s.replacements if name not in target_names}
    params = {n: t for n, t in s.smoothed.items() if n not in target_names}
    modules = dict(s.targets)
    with torch.no_grad():
        deltas = {name: smoothed_weight(modules[name], s.smoothed.get(name)).to(torch.float32) - q.dequantized_weight()
                  for name, q in low.items()}
    loss_increase = fisher_sensitivity(s.model, deltas, batches, s.smoothed)
    # accuracy per byte: the estimated loss increase avoided by each extra byte of the fallback format
    extra = {name: max(1, _format_bytes(high[name]) - low[name].packed_bytes()) for name in low}
    score = {name: loss_increase[name] / extra[name] for name in low}
    promoted, budget = budget_search(s.model, low, high, score, params, batches, s.cfg.max_ppl_increase,
                                     progress=s.progress, fixed=fixed)
    budget.update(fallback=s.cfg.fallback, data=data_name,
                  sensitivity="estimated loss increase (diagonal Fisher) per extra byte of the fallback format")
    _promote(s, promoted, budget["promoted"], loss_increase, high, fallback)
    return budget


def _promote(s: CompressState, promoted, order: list[str], loss_increase: dict, high: dict, fallback) -> None:
    """The budget's promoted layers in the fallback format (or left in float), in the report and swaps."""
    modules = dict(s.targets)
    rank = {name: i for i, name in enumerate(order)}
    for layer in s.layers:
        if layer.name in loss_increase:
            layer.sensitivity = loss_increase[layer.name]
    kept: list[LayerReport] = []
    for layer in s.layers:
        if layer.name not in promoted:
            kept.append(layer)
            continue
        reason = (f"accuracy budget: rank {rank[layer.name] + 1}, estimated loss increase "
                  f"{loss_increase[layer.name]:.3g} nats/token if quantized")
        if fallback is None:
            s.skipped.append(skipped_layer(layer.name, modules[layer.name], f"kept in float by the {reason}"))
            continue
        q = high[layer.name]
        weight = s.originals.get(layer.name)
        if weight is None:
            weight = smoothed_weight(modules[layer.name], s.smoothed.get(layer.name))
        rel, sqnr = weight_error(weight, q)
        kept.append(replace(layer, format=fallback.name, bytes_after=q.packed_bytes(), rel_error=rel, sqnr_db=sqnr,
                            method=f"rtn (w8a16 by the {reason})", output_rel_error=None))
    s.layers[:] = kept
    # a float fallback without smoothing is the layer itself: nothing to swap
    s.replacements[:] = [(name, high[name] if name in promoted else q) for name, q in s.replacements
                         if not (name in promoted and high[name] is modules[name])]


def swap_stage(s: CompressState) -> None:
    """The only stage that changes the model: the smoothed norms / producer Linears that stay in float,
    then the compressed layers."""
    target_names = {name for name, _ in s.targets}
    apply_smoothing(s.model, {n: t for n, t in s.smoothed.items() if n not in target_names})
    for name, q in s.replacements:
        s.model.set_submodule(name, q)
    s.timed("quantization" if s.cfg.quant is not None else "packing", s.quantize_start)


def build_report(s: CompressState) -> CompressReport:
    """The report of a finished compression."""
    return CompressReport(
        config=s.cfg.name,
        layers=s.layers,
        skipped=s.skipped,
        model_bytes_before=s.bytes_before,
        model_bytes_after=model_bytes(s.model),
        seconds=time.perf_counter() - s.start,
        cpu_backend=cpu_backend(),
        stages=s.stages,
        calibration=s.calibration,
        smoothing={k: v for k, v in s.smoothing.items() if k not in ("consumers", "alpha_of")},
        distillation=s.distillation,
        recovery=s.recovery,
        budget=s.budget,
    )


# ---- the block-by-block passes and their callbacks ----------------------------------------------

def _prune_blockwise(s: CompressState) -> dict[str, tuple[torch.Tensor, int]]:
    """SparseGPT / Wanda block by block (:mod:`qruntime.calibration.blockwise`): each block's 2:4 targets are pruned
    with Hessians measured after the earlier blocks were pruned. Fills ``s.pruned``; returns the Hessians
    (for GPTQ). The model's weights are restored before returning, on every path. A model without one
    list of blocks is calibrated in one pass instead (the report's calibration says which)."""
    sp, sparse, pruned, fingerprint = s.cfg.sparsity, s.sparse, s.pruned, s.calibration
    model = s.model
    modules = dict(s.targets)
    originals = {name: modules[name].weight for name in sparse}
    masks: dict[str, torch.Tensor] = {}
    current: list[str] = []
    tuned: list[dict] = []
    home = home_device(model)  # onloading (compress(device=...)): results leave the execution device

    def compress_block(hessians: dict) -> None:
        _send_home(pruned, current, home)
        _send_home(masks, current, home)
        current[:] = [name for name in hessians if name in sparse]
        for name in current:
            module = modules[name]
            pruned[name], masks[name] = prune_weight(linear_weight(module), sp.method, hessians[name][0], 2, 4,
                                                     damp=sp.damp, block_size=sp.block_size)
            w = pruned[name].to(module.weight.dtype)
            _park(module.weight, home)
            module.weight = nn.Parameter(w.t().contiguous() if is_conv1d(module) else w, requires_grad=False)

    from qruntime.quant.tune import tune_block_weights

    tune = _block_tuner(tune_block_weights, modules, current, masks, tuned, steps=sp.tune_steps, lr=sp.tune_lr)

    def tune_block(index: int, block: nn.Module, inputs: list, outputs: list) -> None:
        if tune(index, block, inputs, outputs).kept:
            for name in current:
                pruned[name] = linear_weight(modules[name]).detach().to(torch.float64)

    try:
        with torch.no_grad():
            return _blockwise_or_one_pass(model, modules, s.calib_data, compress_block, pruned, fingerprint,
                                          s.progress, tune_block if sp.tune_steps else None, s.precision)
    finally:
        _send_home(pruned, current, home)
        for name, weight in originals.items():
            modules[name].weight = weight
        if sp.tune_steps:
            fingerprint.update(tuned="kept weights", tuned_blocks=tuned)


def _blockwise_or_one_pass(model, modules, calib_data, compress_block, results: dict, fingerprint, progress,
                           tune_block=None, precision=None, keep_hessians=True):
    """:func:`qruntime.calibration.blockwise.blockwise_calibrate`; for a model without one list of blocks, one pass
    of :func:`collect_stats` instead (``results`` of the blocks cleared, the fingerprint says why)."""
    from qruntime.calibration.blockwise import blockwise_calibrate

    try:
        return blockwise_calibrate(model, modules, calib_data, compress_block, progress=progress,
                                   fingerprint=fingerprint, tune_block=tune_block, precision=precision,
                                   keep_hessians=keep_hessians)
    except ValueError as exc:
        if "nn.ModuleList" not in str(exc):
            raise
        results.clear()
        fingerprint["mode"] = f"one pass ({exc})"
        return collect_stats(model, modules, calib_data, progress=progress, fingerprint=fingerprint,
                             precision=precision)[0]


# the largest relative change of the model's output a fold may make on a calibration batch: rounding only
# (float32: ~1e-6 measured; 16-bit: the folded weights rounded to 8-11 bits); a fold read off a wrong
# block layout changes it by O(1)
FOLD_CHECK_RTOL = {torch.float32: 1e-3, torch.float64: 1e-3}
FOLD_CHECK_RTOL_HALF = 0.1


def _output_tensor(out) -> torch.Tensor:
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return out[0] if isinstance(out, (tuple, list)) else out


def fold_check(model: nn.Module, batch):
    """The ``check`` of :func:`qruntime.quant.smoothquant.plan_groups`: the model's output on one calibration batch
    with the folded tensors swapped in, against its own (rel. error within :data:`FOLD_CHECK_RTOL`)."""
    from qruntime.quant.budget import swapped

    def run() -> torch.Tensor:
        with torch.no_grad():
            return _output_tensor(model(**calibration_inputs(model, batch))).to(torch.float64)

    def check(tensors: dict) -> tuple[dict, str | None]:
        reference = run()
        with swapped(model, {}, tensors):
            folded = run()
        dtype = next(model.parameters()).dtype
        tol = FOLD_CHECK_RTOL.get(dtype, FOLD_CHECK_RTOL_HALF)
        err = float((folded - reference).norm() / reference.norm().clamp_min(1e-30))
        entry = {"rel_error": err, "tolerance": tol}
        if err <= tol:
            return entry, None
        return entry, (f"the folds changed the float model's output by {err:.3g} relative on a calibration batch "
                       f"(over {tol:g}): a block layout of {type(model).__name__} is not what qruntime.plumbing.layouts "
                       "assumes, so nothing was folded")

    return check


def _send_home(store: dict, names: list[str], home: torch.device) -> None:
    """Moves ``store[name]`` (a tensor or module) for each of ``names`` to ``home``, if not there."""
    for name in names:
        if name in store:
            store[name] = store[name].to(home)


def _park(weight: nn.Parameter, home: torch.device) -> nn.Parameter:
    """A weight about to be swapped out of a block held on the execution device: its data goes back to
    ``home`` (the block's move home takes only what is in it then). Returns ``weight``."""
    if weight.device != home:
        weight.data = weight.data.to(home)
    return weight


def _block_tuner(tune, modules: dict[str, nn.Module], current: list[str], state: dict, tuned: list[dict],
                 unrounded: dict[str, torch.Tensor] | None = None, **kwargs):
    """The ``tune_block`` callback of :func:`qruntime.calibration.blockwise.blockwise_calibrate` for a
    :mod:`qruntime.quant.tune` function: tunes the layers ``current`` (those the block's ``compress_block`` just
    compressed) with ``state[name]`` beside each (its QuantLinear, or its 2:4 mask), appends the block's
    entry to ``tuned`` (the report's ``calibration["tuned_blocks"]``) and returns the result. With
    ``unrounded`` (filled by ``compress_block``: a layer's values before rounding), the codes of those
    layers are tuned too."""

    def tune_block(index: int, block: nn.Module, inputs: list, outputs: list):
        relative = {id(m): n for n, m in block.named_modules()}
        layers = {relative[id(modules[n])]: (modules[n], state[n]) for n in current}
        extra = {} if unrounded is None else {"unrounded": {relative[id(modules[n])]: unrounded[n] for n in current}}
        result = tune(block, layers, inputs, outputs, transpose={r: is_conv1d(m) for r, (m, _) in layers.items()},
                      **extra, **kwargs)
        tuned.append({"block": index, "error_before": result.loss_before, "error_after": result.loss_after,
                      "kept": result.kept, "step": result.step})
        return result

    return tune_block


def _quantize_blockwise(s: CompressState) -> dict[str, tuple[torch.Tensor, int]]:
    """GPTQ (and activation-aware clipping) block by block (:mod:`qruntime.calibration.blockwise`): each block's
    targets are quantized with Hessians of the inputs they see once the blocks before them are quantized
    (and smoothed, when SmoothQuant/AWQ scales were planned). Fills ``s.prebuilt`` with the quantized
    layers and ``s.output_errors`` with their output errors (measured on their Hessians once their block is
    done: tuned, when tuning); returns every target's Hessian diagonal (one pass: the full Hessians), so
    that the full Hessians held are those of one block. The model is restored before returning, on every
    path. A model without one list of blocks is calibrated in one pass instead (the report's calibration
    says so)."""
    model, quant, prebuilt, output_errors, fingerprint = s.model, s.cfg.quant, s.prebuilt, s.output_errors, s.calibration
    from qruntime.quant.budget import swapped

    modules = dict(s.targets)
    replaced: dict[str, nn.Parameter] = {}
    current: list[str] = []
    tuned: list[dict] = []
    unrounded: dict[str, torch.Tensor] | None = {} if quant.tune_rounding else None  # the current block's
    home = home_device(model)  # onloading (compress(device=...)): the quantized layers go back there

    pending: dict[str, tuple[torch.Tensor, int]] = {}  # the last block's Hessians, until it is done

    def measure_pending() -> None:
        for name, (hessian, _) in pending.items():
            original = replaced[name].t() if is_conv1d(modules[name]) else replaced[name]
            output_errors[name] = output_error(original, prebuilt[name], hessian)
        pending.clear()

    def compress_block(hessians: dict) -> None:
        measure_pending()
        _send_home(prebuilt, current, home)
        current[:] = list(hessians)
        pending.update(hessians)
        if unrounded is not None:
            unrounded.clear()
        for name, (hessian, _) in hessians.items():
            module = modules[name]
            if unrounded is None:
                q = quantize_linear(module, _layer_quant(quant, hessian), hessian=hessian)
            else:
                q, unrounded[name] = quantize_linear_unrounded(module, _layer_quant(quant, hessian), hessian)
            prebuilt[name] = q
            w = q.dequantized_weight().to(module.weight.dtype)
            replaced.setdefault(name, _park(module.weight, home))
            module.weight = nn.Parameter(w.t().contiguous() if is_conv1d(module) else w, requires_grad=False)

    from qruntime.quant.tune import tune_block_scales

    tune_block = _block_tuner(tune_block_scales, modules, current, prebuilt, tuned, unrounded, steps=quant.tune_steps,
                              lr=quant.tune_lr)

    with torch.no_grad(), swapped(model, {}, s.smoothed):
        try:
            result = _blockwise_or_one_pass(model, modules, s.calib_data, compress_block, prebuilt, fingerprint,
                                            s.progress, tune_block if quant.tune_steps else None, s.precision,
                                            keep_hessians=False)
            measure_pending()
            return result
        finally:
            _send_home(prebuilt, current, home)
            for name, weight in replaced.items():
                modules[name].weight = weight
            if quant.tune_steps:
                fingerprint.update(tuned="scales and codes" if quant.tune_rounding else "scales", tuned_blocks=tuned)


# The stages of compress(), in order (the state's arguments are checked by new_state before them).
STAGES = (distill_stage, select_stage, calibrate_stage, prune_stage, copy_stage, quantize_stage,
          embeddings_stage, budget_stage, swap_stage)
