"""Which layers of a model ``compress()`` converts, and how far a converted layer is from the original.

Owns target selection (include / exclude patterns, the output head, what is left unconverted and why,
with its bytes), the checks a target passes before anything is changed, and the error measures the report
gives per layer. Imports only the formats, modules and report types below it.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import replace

import torch
from torch import nn

from .modules import QuantEmbedding, QuantLinear, SparseLinear, is_conv1d, linear_weight
from qruntime.plumbing.report import SkippedLayer

__all__ = ["OUTPUT_HEAD", "DEFAULT_EXCLUDE", "select_targets", "exclude_match", "output_head", "layer_kind", "LINEAR_KINDS", "skipped_layer",
           "raise_no_targets", "validate_target", "model_bytes", "weight_error", "output_error", "module_name"]


# Heads and embeddings are kept in full precision by default: they are few layers, they dominate the
# accuracy loss when quantized, and lm_head is usually tied to the embedding matrix.
# OUTPUT_HEAD in ``exclude`` matches the model's output head, whatever its name
# (``model.get_output_embeddings()``: RoBERTa's ``lm_head.decoder``, DistilBERT's ``vocab_projector``).
OUTPUT_HEAD = "<output head>"
DEFAULT_EXCLUDE: tuple[str, ...] = (
    OUTPUT_HEAD,
    "lm_head",
    "*.lm_head",
    "*embed*",
    "*wte",
    "*wpe",
    "classifier",
    "*.classifier",
    "classifier.*",
    "score",
    "qa_outputs",
    "cls.*",
)


def layer_kind(module: nn.Module) -> str | None:
    """The report's name for a layer ``compress()`` decides on, or None for any other module."""
    if isinstance(module, (QuantLinear, SparseLinear)):
        return type(module).__name__
    if is_conv1d(module):
        return "Conv1D"
    if isinstance(module, nn.Linear):
        return "Linear"
    return None


LINEAR_KINDS = ("Linear", "Conv1D", "QuantLinear", "SparseLinear")  # the layers select_targets decides on


def select_targets(
    model: nn.Module, config
) -> tuple[list[tuple[str, nn.Module]], list[SkippedLayer]]:
    """The targets of ``config`` (a :class:`qruntime.CompressConfig`, or anything with ``include`` and
    ``exclude`` fnmatch patterns) in ``model``. Every weight matrix of ``model`` either becomes a target or is listed as skipped with its reason
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
        kind = layer_kind(module)
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
        entry = skipped_layer(name, module, reason)
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


def skipped_layer(name: str, module: nn.Module, reason: str) -> SkippedLayer:
    """The report entry of a Linear / Conv1D (its float weight as stored) or an already packed layer
    (its packed bytes, ``dtype`` its format) that is left as it is."""
    kind = layer_kind(module)
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


def raise_no_targets(model: nn.Module, cfg, skipped: list[SkippedLayer]) -> None:
    """The error of a selection that found nothing to convert: what there was, and why each was skipped."""
    linear = [s for s in skipped if s.kind in LINEAR_KINDS]
    detail = "; ".join(f"{s.name}: {s.reason}" for s in linear[:5])
    others = len(skipped) - len(linear)
    raise ValueError(
        f"no convertible layer in {type(model).__name__}: found {len(linear)} Linear/Conv1D layers"
        + (f", all skipped ({detail}{'; ...' if len(linear) > 5 else ''})" if linear else "")
        + f"; include={list(cfg.include)}, exclude={list(cfg.exclude)}"
        + (f"; and {others} other weight tensors (e.g. {skipped[-1].name}), which compress() does not convert"
           if others else "")
    )


def validate_target(name: str, module: nn.Module) -> None:
    """Refuses a target whose weight cannot be quantized: not floating point, not loaded, or not finite."""
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


def weight_error(original: torch.Tensor, q: nn.Module) -> tuple[float, float]:
    """(relative Frobenius error, SQNR in dB) of ``q``'s dequantized weight against ``original``."""
    w = original.detach().to(torch.float64)
    err = torch.linalg.vector_norm(w - q.dequantized_weight().to(torch.float64)).item()
    ref = torch.linalg.vector_norm(w).item()
    rel = err / ref if ref > 0 else 0.0
    sqnr = 20 * math.log10(ref / err) if err > 0 and ref > 0 else float("inf")
    return rel, sqnr


def output_error(original: torch.Tensor, q: nn.Module, hessian: torch.Tensor) -> float:
    """||X (W - Q)^T||_F / ||X W^T||_F over the calibration inputs X, from H = X^T X / rows."""
    w = original.detach().to(torch.float32)
    h = hessian.to(device=w.device, dtype=torch.float32)
    d = w - q.dequantized_weight().to(w.device)
    err = ((d @ h) * d).sum().item()
    ref = ((w @ h) * w).sum().item()
    return math.sqrt(max(err, 0.0) / ref) if ref > 0 else 0.0


def module_name(model: nn.Module, module: nn.Module) -> str | None:
    """The name of ``module`` inside ``model`` (None if it is not there)."""
    return next((name for name, m in model.named_modules() if m is module), None)
