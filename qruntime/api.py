"""`qruntime.compress`: select the Linear/Conv1D layers, quantize them, swap in QuantLinear."""
from __future__ import annotations

import copy
import fnmatch
import math
import time
from collections.abc import Iterable
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm

from .awq import plan_awq
from .calibrate import collect_stats, forward_dtype
from .config import OUTPUT_HEAD, CompressConfig, QuantConfig, data_free_variant, resolve_config
from .distill import distill as run_distill
from .nn import QuantEmbedding, QuantLinear, SparseLinear, is_conv1d, linear_weight
from .offload import check_device, home_device, onloaded
from .ops import cpu_backend
from .prune import prune_weight
from .report import CompressReport, LayerReport, SkippedLayer
from .smooth import apply as apply_smoothing
from .smooth import as_linear, plan_smoothing, smoothed_weight

__all__ = ["compress", "select_targets", "model_bytes", "exclude_match", "output_head", "fold_check"]


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, (QuantLinear, SparseLinear)):
        return type(module).__name__
    if is_conv1d(module):
        return "Conv1D"
    if isinstance(module, nn.Linear):
        return "Linear"
    return None


_LINEAR_KINDS = ("Linear", "Conv1D", "QuantLinear", "SparseLinear")  # the layers select_targets decides on


def select_targets(
    model: nn.Module, config: CompressConfig
) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """Every weight matrix of ``model`` either becomes a target or is listed as skipped with its reason
    and bytes: each Linear/Conv1D by ``config.include`` / ``exclude``; every other parameter with at
    least two dimensions > 1 (fused 3-D MoE experts, bare router weights, convolutions) is skipped, since
    only Linear/Conv1D layers are converted. Norms, biases and [1, 1, d] tokens are not weight matrices;
    embedding tables (nn.Embedding) are left to ``config.embeddings`` (see :func:`compress`) and not
    listed here. A tensor shared by several entries is counted once (by the first)."""
    targets: list[tuple[str, nn.Module]] = []
    skipped: list[SkippedLayer] = []
    first_owner: dict[int, str] = {}  # id(parameter) -> the entry that counted its bytes
    head = output_head(model)
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            skipped += [_count_once(entry, tensor, first_owner) for entry, tensor in _unconverted_parameters(name, module)]
            continue
        if kind in ("QuantLinear", "SparseLinear"):
            reason = "already quantized" if kind == "QuantLinear" else "already 2:4 sparse"
        elif not any(fnmatch.fnmatchcase(name, p) for p in config.include):
            reason = f"not matched by include={list(config.include)}"
        elif hit := exclude_match(name, module, config.exclude, head):
            reason = f"matches exclude pattern {hit!r}"
        else:
            targets.append((name, module))
            continue
        entry = _skipped_layer(name, module, reason)
        skipped.append(_count_once(entry, module.weight, first_owner) if kind in ("Linear", "Conv1D") else entry)
    return targets, skipped


def exclude_match(name: str, module: nn.Module, patterns, head: nn.Module | None) -> str | None:
    """The first of ``patterns`` that excludes the layer: an fnmatch pattern on its name, or OUTPUT_HEAD
    when ``module`` is the model's output head ``head``."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p) or (p == OUTPUT_HEAD and module is head)), None)


def output_head(model: nn.Module) -> nn.Module | None:
    """``model.get_output_embeddings()``, or None where the model has none."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None


def _skipped_layer(name: str, module: nn.Module, reason: str) -> SkippedLayer:
    """The report entry of a Linear / Conv1D (its float weight as stored) or an already packed layer
    (its packed bytes, ``dtype`` its format) that is left as it is."""
    kind = _kind(module)
    if kind in ("QuantLinear", "SparseLinear"):
        return SkippedLayer(name, kind, reason, module.packed_bytes(), [module.out_features, module.in_features],
                            module.format)
    return SkippedLayer.of_tensor(name, kind, reason, module.weight)


def _count_once(entry: SkippedLayer, tensor: torch.Tensor, first_owner: dict[int, str]) -> SkippedLayer:
    """``entry`` with no bytes of its own if ``tensor`` was counted by an earlier entry (tied weights)."""
    first = first_owner.setdefault(id(tensor), entry.name)
    if first == entry.name:
        return entry
    return replace(entry, nbytes=0, reason=f"{entry.reason} (the tensor of {first}, counted there)")


def _unconverted_parameters(prefix: str, module: nn.Module) -> list[tuple[SkippedLayer, torch.Tensor]]:
    """The weight matrices among ``module``'s own parameters (see :func:`select_targets`), as skipped
    entries with their tensors; none for an embedding table."""
    if isinstance(module, (nn.Embedding, QuantEmbedding)):
        return []
    found = []
    for pname, p in module.named_parameters(recurse=False):
        if sum(size > 1 for size in p.shape) >= 2:
            name = f"{prefix}.{pname}" if prefix else pname
            found.append((SkippedLayer.of_tensor(name, type(module).__name__, _parameter_reason(module, p), p), p))
    return found


def _parameter_reason(module: nn.Module, p: torch.Tensor) -> str:
    """Why a non-Linear weight stays as it is, saying what it is: MoE modules of ``transformers`` keep
    ``num_experts`` and stack the experts' matrices along dim 0; their router is [num_experts, hidden]."""
    experts = getattr(module, "num_experts", None)
    dtype = str(p.dtype).removeprefix("torch.")
    if p.dim() == 3 and p.shape[0] == experts:
        what = f"fused 3-D expert weights ({experts} experts of {p.shape[1]} x {p.shape[2]})"
    elif p.dim() == 2 and p.shape[0] == experts:
        what = f"MoE router weight ({experts} experts; a bare parameter, not an nn.Linear)"
    else:
        what = f"{p.dim()}-D parameter of {type(module).__name__}"
    return f"{what}, not quantized: kept in {dtype}, as compress() converts nn.Linear / Conv1D layers only"


def _raise_no_targets(model: nn.Module, cfg: CompressConfig, skipped: list[SkippedLayer]) -> None:
    linear = [s for s in skipped if s.kind in _LINEAR_KINDS]
    detail = "; ".join(f"{s.name}: {s.reason}" for s in linear[:5])
    others = len(skipped) - len(linear)
    raise ValueError(
        f"no convertible layer in {type(model).__name__}: found {len(linear)} Linear/Conv1D layers"
        + (f", all skipped ({detail}{'; ...' if len(linear) > 5 else ''})" if linear else "")
        + f"; include={list(cfg.include)}, exclude={list(cfg.exclude)}"
        + (f"; and {others} other weight tensors (e.g. {skipped[-1].name}), which compress() does not convert"
           if others else "")
    )


def _validate_target(name: str, module: nn.Module) -> None:
    weight = linear_weight(module)
    if not weight.is_floating_point():
        raise TypeError(f"layer {name!r}: weight dtype {weight.dtype} is not a floating-point dtype")
    if weight.device.type == "meta":
        raise ValueError(f"layer {name!r}: weight is on the meta device (not loaded); load the weights first")
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"layer {name!r}: weight has {bad} NaN/Inf values; refusing to quantize")


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, each shared tensor counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _weight_error(original: torch.Tensor, q: nn.Module) -> tuple[float, float]:
    w = original.detach().to(torch.float64)
    err = torch.linalg.vector_norm(w - q.dequantized_weight().to(torch.float64)).item()
    ref = torch.linalg.vector_norm(w).item()
    rel = err / ref if ref > 0 else 0.0
    sqnr = 20 * math.log10(ref / err) if err > 0 and ref > 0 else float("inf")
    return rel, sqnr


def _output_error(original: torch.Tensor, q: nn.Module, hessian: torch.Tensor) -> float:
    """||X (W - Q)^T||_F / ||X W^T||_F over the calibration inputs X, from H = X^T X / rows."""
    w = original.detach().to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)
    d = w - q.dequantized_weight().to(w.device)
    err = ((d @ h) * d).sum().item()
    ref = ((w @ h) * w).sum().item()
    return math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def _quantize_embeddings(
    model: nn.Module,
    quant: QuantConfig,
    replacements: list[tuple[str, nn.Module]],
    layers: list[LayerReport],
    skipped: list[SkippedLayer],
) -> None:
    """Adds the input embedding (and an output head tied to it) to ``replacements`` and the report."""
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(emb, nn.Embedding):
        found = type(emb).__name__ if emb is not None else "no get_input_embeddings()"
        skipped.append(SkippedLayer("<input embedding>", "Embedding", f"embeddings={quant.name} asked, but the model has {found}, not an nn.Embedding"))
        return
    name = _module_name(model, emb)
    if not torch.isfinite(emb.weight).all():
        raise ValueError(f"embedding {name!r}: weight has NaN/Inf values; refusing to quantize")
    with torch.no_grad():
        q = QuantEmbedding.from_embedding(emb, quant)
        rel, sqnr = _weight_error(emb.weight, q)
    replacements.append((name, q))
    nbytes = emb.weight.numel() * emb.weight.element_size()
    layers.append(LayerReport(name, "Embedding", q.embedding_dim, q.num_embeddings, quant.name, nbytes,
                              q.packed_bytes(), rel, sqnr, method="rtn"))
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(head, nn.Linear) and head.weight is emb.weight:
        head_name = _module_name(model, head)
        replacements[:] = [(n, m) for n, m in replacements if n != head_name]
        layers[:] = [l for l in layers if l.name != head_name]
        skipped[:] = [s for s in skipped if s.name != head_name]
        with torch.no_grad():
            replacements.append((head_name, QuantLinear.tied_to(q, head.bias)))
        # stored once, with the embedding: no bytes of its own
        layers.append(LayerReport(head_name, "Linear", q.embedding_dim, q.num_embeddings, quant.name, 0, 0, rel,
                                  sqnr, method=f"tied to {name} (shares its packed weight)"))


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
        model: any ``nn.Module``; HF BERT, GPT-2 (Conv1D), Llama-family and others.
        config: a preset name (``"w8a16"``, ``"w4a16-g128"``, see :mod:`qruntime.config`), a
            :class:`QuantConfig` or a :class:`CompressConfig`.
        calib_data: for calibrated recipes (GPTQ: ``w4a16-g128`` and ``*-gptq``; SmoothQuant: ``w8a8``;
            ``-clip``, ``-awq``, ``-tune``, budgets, ``2:4``): an iterable of input-id tensors [batch, seq]
            or of dicts of model keyword arguments (a tokenized ``datasets.Dataset`` works: its lists of ids
            become tensors), e.g.
            ``qruntime.calibrate.calibration_batches(tokenizer)``. Ignored by round-to-nearest. With a
            depth stage, the student is calibrated on it after distillation.
        train_data: for a depth stage (``"d20+..."``, ``CompressConfig(distill=...)``): the batches the
            student is distilled on (see :func:`qruntime.distill`), e.g.
            ``qruntime.calibrate.calibration_batches(tokenizer, 64, 256, split="train")``.
        eval_data: held-out batches to measure the student before and after distillation, and the
            perplexity of the accuracy budget (optional; the budget uses the calibration data without it).
        inplace: swap the layers in ``model``; with False a deep copy is compressed and ``model`` is
            left untouched. With a depth stage the result is always a new model (the student) and
            ``model`` (the teacher) is left untouched.
        progress: show a progress bar.
        max_ppl_increase: an accuracy budget (overrides the recipe's, see :mod:`qruntime.mixed`): e.g.
            0.02 keeps the most sensitive layers in INT8 until the measured perplexity is within 2% of
            the original's.
        device: where the calibration passes run (Hessians, block-by-block GPTQ / SparseGPT / Wanda and
            block tuning, the AWQ / SmoothQuant statistics), e.g. ``"cuda"`` for a model in CPU RAM that
            does not fit on the GPU: the model stays where it is and each block (and each other module
            with weights) is moved to ``device`` only while it runs (:mod:`qruntime.offload`); the
            compressed layers end up where the model is. ``None``: where the model is. A depth stage,
            a 2:4 recovery stage and the accuracy budget run where the model is.
        calib_precision: the precision of the calibration forwards' matmuls (and of X^T X) for a float32
            model: ``"auto"`` (default): bfloat16 under ``torch.autocast`` where the calibration device
            multiplies bf16 in hardware (CUDA GPUs with bf16, CPUs with AVX512_BF16 or AMX), else float32;
            ``"bfloat16"``: always; ``"model"``: the model's own dtype (float32: several times slower on
            such CPUs). Norms, the residual stream, the Hessian sums and GPTQ's solves stay in float32 /
            float64; block tuning runs under the same autocast (its parameters, loss and optimizer in
            float32); a depth stage, a recovery stage and the accuracy budget are not affected. The
            report's calibration says which ran (:func:`qruntime.calibrate.forward_dtype`).

    Returns:
        ``(model, report)``. ``report.skipped`` lists every weight left as it was with its reason and
        bytes, non-Linear ones included (fused 3-D MoE experts, bare router weights: not quantized), and
        ``report.total_weight_bytes_before/after`` count them. On any error the caller's model is left
        exactly as it was: every layer is checked and quantized before the first one is swapped in.
    """
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
    start = time.perf_counter()
    stages: dict[str, float] = {}
    distillation: dict = {}
    bytes_before = model_bytes(model)  # with a depth stage: the teacher's
    if cfg.distill is not None:
        if train_data is None:
            raise ValueError(
                f"recipe {cfg.name!r} has a depth stage and needs train_data: batches of input ids to distill "
                "the student on, e.g. qruntime.calibrate.calibration_batches(tokenizer, 64, 256, split='train')"
            )
        t0 = time.perf_counter()
        model, distill_report = run_distill(model, None, train_data, cfg.distill, eval_data=eval_data, progress=progress)
        stages["distillation"] = time.perf_counter() - t0
        distillation = distill_report.to_dict()
        inplace = True  # the student is already a new model
    targets, skipped = select_targets(model, cfg)
    if not targets:
        _raise_no_targets(model, cfg, skipped)
    for name, module in targets:
        _validate_target(name, module)
    sp = cfg.sparsity
    if sp is not None and sp.recover is not None and train_data is None:
        raise ValueError(
            f"recipe {cfg.name!r} has a recovery stage and needs train_data: batches of input ids to distill the "
            "pruned model on, e.g. qruntime.calibrate.calibration_batches(tokenizer, 64, 256, split='train')"
        )
    # 2:4 targets, and those a sparsity skip pattern keeps dense (quantized, or left alone without quant)
    sparse: set[str] = set()
    dense_note: dict[str, str] = {}
    if sp is not None:
        kept_targets = []
        for name, module in targets:
            hit = next((p for p in sp.skip if fnmatch.fnmatchcase(name, p)), None)
            if hit is None:
                sparse.add(name)
            elif cfg.quant is None:
                skipped.append(_skipped_layer(name, module, f"matches sparsity skip pattern {hit!r} (kept dense)"))
                continue
            else:
                dense_note[name] = f" (dense: matches sparsity skip pattern {hit!r})"
            kept_targets.append((name, module))
        targets = kept_targets
        if not targets:
            raise ValueError(f"sparsity skip={list(sp.skip)} leaves no layer of {type(model).__name__} to compress")
    calibration: dict = {}
    quant_hessians = cfg.quant is not None and cfg.quant.needs_calibration
    # GPTQ / activation-aware clipping block by block: each block quantized on the outputs of the
    # quantized blocks before it (QuantConfig.sequential; 2:4 recipes have their own block-wise pass)
    sequential = quant_hessians and cfg.quant.sequential and sp is None
    prebuilt: dict[str, nn.Module] = {}  # layers quantized during the block-by-block pass
    output_errors: dict[str, float] = {}  # their output errors, measured there (the Hessians are not kept)
    if cfg.needs_calibration:
        if calib_data is None:
            free = data_free_variant(cfg)
            hint = f" (or the data-free {free.name!r})" if free is not None else ""
            raise ValueError(
                f"recipe {cfg.name!r} needs calib_data: an iterable of input-id tensors or dicts of model "
                f"inputs, e.g. qruntime.calibrate.calibration_batches(tokenizer){hint}"
            )
        calib_data = calib_data if isinstance(calib_data, (list, tuple)) else list(calib_data)
    pruned: dict[str, torch.Tensor] = {}  # 2:4 target -> its pruned weight [N, K] (float64)
    originals: dict[str, torch.Tensor] = {}  # with a recovery stage: the original weights, for the report
    with onloaded(model, device if cfg.needs_calibration else None):
        # hessians: layer -> (X^T X / rows, rows), block by block its diagonal; smoothed: module -> smoothed tensors
        hessians, smoothed, smoothing = _calibrate(model, cfg, targets, sparse, calib_data, sequential, quant_hessians,
                                                   pruned, (prebuilt, output_errors), calibration, stages, progress,
                                                   precision)
    if cfg.needs_calibration:
        calibration["precision"] = f"{precision} matmuls (autocast)".replace("torch.", "") if precision else "model"
        if device is not None:
            calibration["device"] = str(device)

    recovery: dict = {}
    if sp is not None:
        t0 = time.perf_counter()
        for name, module in tqdm([t for t in targets if t[0] in sparse and t[0] not in pruned],
                                 desc=f"prune 2:4 {sp.method}", unit="layer", disable=not progress):
            hessian = hessians.get(name, (None, 0))[0]
            method = sp.method if hessian is not None or sp.method == "magnitude" else "magnitude"
            with torch.no_grad():
                pruned[name] = prune_weight(linear_weight(module), method, hessian, 2, 4, damp=sp.damp,
                                            block_size=sp.block_size)[0]
            if method != sp.method:
                dense_note[name] = " (magnitude: calibration data never reached this layer)"
        stages["pruning"] = time.perf_counter() - t0
        if sp.recover is not None:
            # the report measures each layer against the original weights, not the trained ones
            originals = {name: smoothed_weight(module, None) for name, module in targets}
            t0 = time.perf_counter()
            model, targets, recovery = _recover(model, targets, pruned, train_data, eval_data, sp.recover, progress)
            stages["recovery"] = time.perf_counter() - t0
            inplace = True  # the recovered model is a new model
            if quant_hessians:  # GPTQ codes for the recovered weights: calibrate them again
                t0 = time.perf_counter()
                hessians = collect_stats(model, dict(targets), calib_data, progress=progress,
                                         precision=forward_dtype(model, calib_precision))[0]
                stages["calibration (recovered model)"] = time.perf_counter() - t0

    if not inplace:
        model = copy.deepcopy(model)
        targets = [(name, model.get_submodule(name)) for name, _ in targets]
    target_names = {name for name, _ in targets}

    t0 = time.perf_counter()
    replacements: list[tuple[str, nn.Module]] = []
    layers: list[LayerReport] = []
    for name, module in tqdm(targets, desc=f"{'pack' if cfg.quant is None else 'quantize'} {cfg.name}",
                             unit="layer", disable=not progress):
        weight = originals[name] if name in originals else smoothed_weight(module, smoothed.get(name))
        hessian, rows = hessians.get(name, (None, 0))
        method = _method(cfg, name in sparse, hessian, rows) + dense_note.get(name, "")
        if name in smoothing.get("consumers", ()):
            method += f" + {smoothing['method']} (alpha {smoothing['alpha_of'][name]:g})"
        with torch.no_grad():
            if name in sparse:
                q = SparseLinear.from_pruned(pruned[name], module.bias, cfg.quant,
                                             hessian if quant_hessians else None, dtype=weight.dtype)
            elif name in prebuilt:
                q = prebuilt[name]
            else:
                source = module if name not in smoothed else as_linear(weight, smoothed[name].get("bias"))
                q = QuantLinear.from_linear(source, _layer_quant(cfg.quant, hessian), hessian=hessian)
            rel, sqnr = _weight_error(weight, q)
            out_err = output_errors.get(name)
            if out_err is None and hessian is not None:
                out_err = _output_error(weight, q, hessian)
        replacements.append((name, q))
        layers.append(
            LayerReport(
                name=name,
                kind=_kind(module),
                in_features=q.in_features,
                out_features=q.out_features,
                format=q.format if name in sparse else cfg.quant.name,
                bytes_before=weight.numel() * weight.element_size(),
                bytes_after=q.packed_bytes(),
                rel_error=rel,
                sqnr_db=sqnr,
                method=method,
                output_rel_error=out_err,
                sparsity=(pruned[name] == 0).double().mean().item() if name in sparse else None,
            )
        )
    if cfg.embeddings is not None:
        _quantize_embeddings(model, cfg.embeddings, replacements, layers, skipped)
    budget: dict = {}
    if cfg.max_ppl_increase is not None:
        t1 = time.perf_counter()
        budget = _apply_budget(model, cfg, targets, replacements, layers, skipped, smoothed, originals,
                               eval_data if eval_data is not None else calib_data,
                               "eval_data" if eval_data is not None else "calibration data", progress)
        stages["accuracy budget"] = time.perf_counter() - t1
    # last: the smoothed norms / producer Linears that stay in float, then the quantized layers
    apply_smoothing(model, {n: t for n, t in smoothed.items() if n not in target_names})
    for name, q in replacements:
        model.set_submodule(name, q)
    stages["quantization" if cfg.quant is not None else "packing"] = time.perf_counter() - t0

    report = CompressReport(
        config=cfg.name,
        layers=layers,
        skipped=skipped,
        model_bytes_before=bytes_before,
        model_bytes_after=model_bytes(model),
        seconds=time.perf_counter() - start,
        cpu_backend=cpu_backend(),
        stages=stages,
        calibration=calibration,
        smoothing={k: v for k, v in smoothing.items() if k not in ("consumers", "alpha_of")},
        distillation=distillation,
        recovery=recovery,
        budget=budget,
    )
    return model, report


def _format_bytes(module: nn.Module) -> int:
    """Bytes of a layer's weight as stored: packed (QuantLinear) or float."""
    if hasattr(module, "packed_bytes"):
        return module.packed_bytes()
    w = linear_weight(module)
    return w.numel() * w.element_size()


def _apply_budget(model, cfg, targets, replacements, layers, skipped, smoothed, originals,
                  batches, data_name, progress) -> dict:
    """The accuracy budget (:mod:`qruntime.mixed`): measures which targets need the fallback format and
    rewrites ``replacements``, ``layers`` and ``skipped`` for them. Returns the report entry."""
    from .mixed import budget_search, fisher_sensitivity

    target_names = {name for name, _ in targets}
    fallback = QuantConfig(bits=8) if cfg.fallback == "w8a16" else None
    high: dict[str, nn.Module] = {}
    with torch.no_grad():
        for name, module in targets:
            weight = originals[name] if name in originals else smoothed_weight(module, smoothed.get(name))
            source = module if name not in smoothed else as_linear(weight, smoothed[name].get("bias"))
            high[name] = QuantLinear.from_linear(source, fallback) if fallback is not None else source
    low = {name: q for name, q in replacements if name in target_names}
    fixed = {name: q for name, q in replacements if name not in target_names}
    params = {n: t for n, t in smoothed.items() if n not in target_names}
    modules = dict(targets)
    batches = list(batches)
    with torch.no_grad():
        deltas = {name: smoothed_weight(modules[name], smoothed.get(name)).to(torch.float32) - q.dequantized_weight()
                  for name, q in low.items()}
    loss_increase = fisher_sensitivity(model, deltas, batches, smoothed)
    # accuracy per byte: the estimated loss increase avoided by each extra byte of the fallback format
    extra = {name: max(1, _format_bytes(high[name]) - low[name].packed_bytes()) for name in low}
    score = {name: loss_increase[name] / extra[name] for name in low}
    promoted, budget = budget_search(model, low, high, score, params, batches, cfg.max_ppl_increase,
                                     progress=progress, fixed=fixed)
    budget["fallback"] = cfg.fallback
    budget["data"] = data_name
    budget["sensitivity"] = "estimated loss increase (diagonal Fisher) per extra byte of the fallback format"
    rank = {name: i for i, name in enumerate(budget["promoted"])}
    for layer in layers:
        if layer.name in loss_increase:
            layer.sensitivity = loss_increase[layer.name]
    kept: list[LayerReport] = []
    for layer in layers:
        if layer.name not in promoted:
            kept.append(layer)
            continue
        reason = (f"accuracy budget: rank {rank[layer.name] + 1}, estimated loss increase "
                  f"{loss_increase[layer.name]:.3g} nats/token if quantized")
        if fallback is None:
            skipped.append(_skipped_layer(layer.name, modules[layer.name], f"kept in float by the {reason}"))
            continue
        q = high[layer.name]
        weight = originals.get(layer.name)
        if weight is None:
            weight = smoothed_weight(modules[layer.name], smoothed.get(layer.name))
        rel, sqnr = _weight_error(weight, q)
        kept.append(replace(layer, format=fallback.name, bytes_after=q.packed_bytes(), rel_error=rel, sqnr_db=sqnr,
                            method=f"rtn (w8a16 by the {reason})", output_rel_error=None))
    layers[:] = kept
    # a float fallback without smoothing is the layer itself: nothing to swap
    replacements[:] = [(name, high[name] if name in promoted else q) for name, q in replacements
                       if not (name in promoted and high[name] is modules[name])]
    return budget


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


def _prune_blockwise(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    sparse: set[str],
    calib_data: list,
    sp,
    pruned: dict[str, torch.Tensor],
    fingerprint: dict,
    progress: bool,
    precision: torch.dtype | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """SparseGPT / Wanda block by block (:mod:`qruntime.sequential`): each block's 2:4 targets are pruned
    with Hessians measured after the earlier blocks were pruned. Fills ``pruned``; returns the Hessians
    (for GPTQ). The model's weights are restored before returning, on every path. A model without one
    list of blocks is calibrated in one pass instead (the report's calibration says which)."""

    modules = dict(targets)
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

    from .tune import tune_block_weights

    tune = _block_tuner(tune_block_weights, modules, current, masks, tuned, steps=sp.tune_steps, lr=sp.tune_lr)

    def tune_block(index: int, block: nn.Module, inputs: list, outputs: list) -> None:
        if tune(index, block, inputs, outputs).kept:
            for name in current:
                pruned[name] = linear_weight(modules[name]).detach().to(torch.float64)

    try:
        with torch.no_grad():
            return _blockwise_or_one_pass(model, modules, calib_data, compress_block, pruned, fingerprint, progress,
                                          tune_block if sp.tune_steps else None, precision)
    finally:
        _send_home(pruned, current, home)
        for name, weight in originals.items():
            modules[name].weight = weight
        if sp.tune_steps:
            fingerprint.update(tuned="kept weights", tuned_blocks=tuned)


def _blockwise_or_one_pass(model, modules, calib_data, compress_block, results: dict, fingerprint, progress,
                           tune_block=None, precision=None, keep_hessians=True):
    """:func:`qruntime.sequential.blockwise_calibrate`; for a model without one list of blocks, one pass
    of :func:`collect_stats` instead (``results`` of the blocks cleared, the fingerprint says why)."""
    from .sequential import blockwise_calibrate

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


def _calibrate(model, cfg, targets, sparse, calib_data, sequential, quant_hessians, pruned, prebuilt, calibration,
               stages, progress, precision=None):
    """The calibration passes of :func:`compress` (inside :func:`qruntime.offload.onloaded`): 2:4 pruning
    block by block, or one pass of statistics (with the AWQ / SmoothQuant scale plans), then GPTQ block by
    block. Fills ``pruned``, ``prebuilt`` (the layers quantized block by block, and their output errors),
    ``calibration`` and ``stages``; returns (Hessians, smoothed tensors, smoothing report)."""
    sp = cfg.sparsity
    hessians: dict[str, tuple[torch.Tensor, int]] = {}
    smoothed: dict[str, dict[str, torch.Tensor]] = {}
    smoothing: dict = {}
    if sp is not None and sp.needs_calibration and sp.sequential:
        t0 = time.perf_counter()
        hessians = _prune_blockwise(model, targets, sparse, calib_data, sp, pruned, calibration, progress, precision)
        stages["calibration + pruning (block by block)"] = time.perf_counter() - t0
    elif cfg.needs_calibration and not (sequential and cfg.smoothquant is None and not cfg.awq):
        t0 = time.perf_counter()
        hessians, absmax = collect_stats(model, dict(targets), calib_data,
                                         hessian=quant_hessians or cfg.awq or cfg.max_ppl_increase is not None
                                         or (sp is not None and sp.needs_calibration),
                                         absmax=cfg.smoothquant is not None,
                                         samples=1024 if cfg.smoothquant == "auto" else 0,
                                         progress=progress, fingerprint=calibration, precision=precision)
        stages["calibration"] = time.perf_counter() - t0
        check = fold_check(model, next(iter(calib_data)))
        if cfg.smoothquant is not None:
            smoothed, smoothing = plan_smoothing(model, dict(targets), absmax, cfg.smoothquant, hessians, check)
        elif cfg.awq:
            t0 = time.perf_counter()
            smoothed, smoothing = plan_awq(model, dict(targets), hessians, cfg.quant, check=check)
            stages["awq scale search"] = time.perf_counter() - t0
    if sequential and calib_data is not None:
        t0 = time.perf_counter()
        hessians = _quantize_blockwise(model, targets, calib_data, cfg.quant, smoothed, prebuilt, calibration,
                                       progress, precision)
        stages["calibration + quantization (block by block)" if prebuilt[0] else "calibration"] = time.perf_counter() - t0
    return hessians, smoothed, smoothing


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
    """The ``check`` of :func:`qruntime.smooth.plan_groups`: the model's output on one calibration batch
    with the folded tensors swapped in, against its own (rel. error within :data:`FOLD_CHECK_RTOL`)."""
    from .distill import calibration_inputs
    from .mixed import swapped

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
                       f"(over {tol:g}): a block layout of {type(model).__name__} is not what qruntime.layouts "
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
    """The ``tune_block`` callback of :func:`qruntime.sequential.blockwise_calibrate` for a
    :mod:`qruntime.tune` function: tunes the layers ``current`` (those the block's ``compress_block`` just
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


def _layer_quant(quant: QuantConfig, hessian: torch.Tensor | None) -> QuantConfig:
    """A layer no calibration data reached has no activations to weight its clipping: "mse" instead."""
    return replace(quant, clip="mse") if quant.clip == "act" and hessian is None else quant


def _quantize_blockwise(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    calib_data: list,
    quant: QuantConfig,
    smoothed: dict[str, dict[str, torch.Tensor]],
    built: tuple[dict[str, nn.Module], dict[str, float]],
    fingerprint: dict,
    progress: bool,
    precision: torch.dtype | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """GPTQ (and activation-aware clipping) block by block (:mod:`qruntime.sequential`): each block's
    targets are quantized with Hessians of the inputs they see once the blocks before them are quantized
    (and smoothed, when SmoothQuant/AWQ scales were planned). Fills ``built`` with the quantized layers
    and their output errors (measured on their Hessians once their block is done: tuned, when tuning);
    returns every target's Hessian diagonal (one pass: the full Hessians), so that the full Hessians held
    are those of one block. The model is restored before returning, on every path. A
    model without one list of blocks is calibrated in one pass instead (the report's calibration says so)."""
    from .mixed import swapped

    modules = dict(targets)
    replaced: dict[str, nn.Parameter] = {}
    current: list[str] = []
    tuned: list[dict] = []
    unrounded: dict[str, torch.Tensor] | None = {} if quant.tune_rounding else None  # the current block's
    home = home_device(model)  # onloading (compress(device=...)): the quantized layers go back there

    prebuilt, output_errors = built
    pending: dict[str, tuple[torch.Tensor, int]] = {}  # the last block's Hessians, until it is done

    def measure_pending() -> None:
        for name, (hessian, _) in pending.items():
            original = replaced[name].t() if is_conv1d(modules[name]) else replaced[name]
            output_errors[name] = _output_error(original, prebuilt[name], hessian)
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
                q = QuantLinear.from_linear(module, _layer_quant(quant, hessian), hessian=hessian)
            else:
                q, unrounded[name] = QuantLinear.from_linear_unrounded(module, _layer_quant(quant, hessian), hessian)
            prebuilt[name] = q
            w = q.dequantized_weight().to(module.weight.dtype)
            replaced.setdefault(name, _park(module.weight, home))
            module.weight = nn.Parameter(w.t().contiguous() if is_conv1d(module) else w, requires_grad=False)

    from .tune import tune_block_scales

    tune_block = _block_tuner(tune_block_scales, modules, current, prebuilt, tuned, unrounded, steps=quant.tune_steps,
                              lr=quant.tune_lr)

    with torch.no_grad(), swapped(model, {}, smoothed):
        try:
            result = _blockwise_or_one_pass(model, modules, calib_data, compress_block, prebuilt, fingerprint,
                                            progress, tune_block if quant.tune_steps else None, precision,
                                            keep_hessians=False)
            measure_pending()
            return result
        finally:
            _send_home(prebuilt, current, home)
            for name, weight in replaced.items():
                modules[name].weight = weight
            if quant.tune_steps:
                fingerprint.update(tuned="scales and codes" if quant.tune_rounding else "scales", tuned_blocks=tuned)


def _recover(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    pruned: dict[str, torch.Tensor],
    train_data: Iterable,
    eval_data: Iterable | None,
    config,
    progress: bool,
) -> tuple[nn.Module, list[tuple[str, nn.Module]], dict]:
    """The 2:4 recovery stage: a copy of ``model`` with the pruned weights, distilled from ``model``
    with the masks fixed. Updates ``pruned`` with the trained weights (still exactly 2:4) and returns
    (the trained copy, its targets, the distillation report as a dict)."""
    student = copy.deepcopy(model)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in pruned:
            module = student.get_submodule(name)
            w = pruned[name].to(module.weight.dtype)
            module.weight.copy_(w.t() if is_conv1d(module) else w)
            masks[f"{name}.weight"] = (module.weight != 0).to(module.weight.dtype)
    student, report = run_distill(model, student, train_data, config, eval_data=eval_data, masks=masks,
                                  progress=progress)
    targets = [(name, student.get_submodule(name)) for name, _ in targets]
    for name in pruned:
        pruned[name] = linear_weight(student.get_submodule(name)).detach().to(torch.float64)
    return student, targets, report.to_dict()
