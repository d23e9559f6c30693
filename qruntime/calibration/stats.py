"""Calibration: run sample batches through the model and collect what each method needs.

Per target layer's input X: the Hessian proxy ``H = X^T X / rows`` (GPTQ and the other Hessian-based
methods), the per-channel absolute maximum and sample rows of X (SmoothQuant); also the calibration
batches from text (:func:`calibration_batches`, :func:`sentence_batches`).
Hooks are removed on every exit path, and the model's weights are never modified here.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from qruntime.plumbing.offload import execution_device, home_device
from qruntime.plumbing.model import autocast, autocast_dtype, find_blocks, model_inputs

__all__ = ["text_batches", "collect_hessians", "collect_stats", "check_token_ids",
           "forward_dtype", "CALIB_PRECISIONS"]

# compress(calib_precision=...): the precision of the calibration forwards' matmuls (see forward_dtype)
CALIB_PRECISIONS = ("auto", "model", "bfloat16")


def forward_dtype(model: nn.Module, precision: str = "auto", device: torch.device | None = None) -> torch.dtype | None:
    """The dtype the matmuls of the calibration forwards run in (under ``torch.autocast``), or None for
    the model's own dtype. ``precision`` (``compress(calib_precision=...)``): ``"model"``: the model's
    dtype; ``"bfloat16"``: bfloat16 matmuls for a float32 model; ``"auto"``: bfloat16 for a float32
    model when ``device`` (default: where the model's weights are) multiplies bf16 in hardware (as the
    distillation's ``autocast="auto"`` decides: CUDA with bf16, or a CPU with AVX512_BF16 or AMX), else
    the model's. Only float32 models are affected: a half-precision model already computes in its dtype.
    Everything else (norms, softmax, the residual stream, the accumulated Hessians, GPTQ's solves)
    stays in the model's dtype or float64."""
    if precision not in CALIB_PRECISIONS:
        raise ValueError(f"calib_precision={precision!r}: must be one of {list(CALIB_PRECISIONS)}")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if precision == "model" or param is None or param.dtype != torch.float32:
        return None
    device = torch.device(device) if device is not None else param.device
    return autocast_dtype("bf16" if precision == "bfloat16" else "auto", device)


def text_batches(tokenizer, text: str, num_samples: int = 128, seq_len: int = 512, source: str = "text") -> list[torch.Tensor]:
    """``num_samples`` consecutive, non-overlapping windows of ``seq_len`` tokens of ``text``, each a
    LongTensor [1, seq_len] (for calibrating on your own text)."""
    if num_samples < 1 or seq_len < 2:
        raise ValueError(f"num_samples={num_samples}, seq_len={seq_len}: need num_samples >= 1, seq_len >= 2")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < num_samples * seq_len:
        raise ValueError(
            f"{source} has {len(ids)} tokens, fewer than num_samples * seq_len = {num_samples * seq_len}"
        )
    return list(torch.tensor(ids[: num_samples * seq_len]).reshape(num_samples, 1, seq_len))


def sentence_batches(
    tokenizer,
    text: str | Sequence[str],
    batch_size: int = 32,
    max_length: int = 128,
    *,
    min_words: int = 4,
    sort_by_length: bool = True,
    limit: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Batches of whole sentences for training or evaluating an encoder (sentence embeddings): dicts of
    ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) [B, T], each
    batch padded to its longest sentence, at most ``max_length`` tokens.

    ``text``: one string, split into sentences after ``.``, ``!`` or ``?`` and at line breaks, keeping
    those of at least ``min_words`` words; or a list of sentences, kept as given. ``limit``: at most this
    many batches, from the first ``limit * batch_size`` sentences. ``sort_by_length``: batch sentences of
    similar token length together (a stable sort by length), so the batches carry almost no padding
    (Wikipedia sentences of the training split in text order, 32 a batch: 58% of the padded tokens
    were padding; sorted: 0.4%). The batches then go from the shortest sentences to the longest: train
    with ``DistillConfig(shuffle=True)``. A measured block selection without ``selection_data`` runs on
    batches spread evenly over them, short and long; ``selection_data`` in text order is closer still
    to the text the model will see. Every sentence is in exactly one batch; the last batch may be smaller.
    """
    if batch_size < 1 or max_length < 2 or min_words < 0:
        raise ValueError(
            f"batch_size={batch_size}, max_length={max_length}, min_words={min_words}: "
            "need batch_size >= 1, max_length >= 2, min_words >= 0"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit}: must be >= 1 or None")
    if isinstance(text, str):
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
        sentences = [s for s in sentences if s and len(s.split()) >= min_words]
    else:
        sentences = list(text)
        if not sentences:
            raise ValueError("text: an empty list of sentences")
        bad = [i for i, s in enumerate(sentences) if not isinstance(s, str) or not s.strip()]
        if bad:
            raise ValueError(f"text: sentences {bad[:5]} are empty or not strings")
    if limit is not None:
        sentences = sentences[: limit * batch_size]
    if not sentences:
        raise ValueError(f"text has no sentence of at least min_words={min_words} words")
    encoded = tokenizer(sentences, truncation=True, max_length=max_length)
    rows = [{k: encoded[k][i] for k in encoded.keys()} for i in range(len(sentences))]
    if sort_by_length:
        rows.sort(key=lambda r: len(r["input_ids"]))
    out = []
    for i in range(0, len(rows), batch_size):
        batch = tokenizer.pad(rows[i : i + batch_size], padding=True, return_tensors="pt")
        out.append({k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch})
    return out


def check_token_ids(model: nn.Module, batch, what: str = "calibration batch") -> None:
    """Raises ValueError when ``batch``'s input ids fall outside the model's vocabulary (text tokenized
    with another model's tokenizer): an embedding lookup would fail with an opaque IndexError or, on a
    GPU, an assertion deep in a kernel."""
    ids = batch if isinstance(batch, torch.Tensor) else batch.get("input_ids") if isinstance(batch, Mapping) else None
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    size = getattr(emb, "num_embeddings", None)
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0 or size is None or ids.is_floating_point():
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        bad = high if high >= size else low
        raise ValueError(
            f"{what}: token id {bad} outside the model's vocabulary [0, {size}): was the text tokenized with "
            "another model's tokenizer?"
        )


def _run(model: nn.Module, batch, device: torch.device) -> None:
    check_token_ids(model, batch)
    if isinstance(batch, torch.Tensor):  # the model's one positional input (any dtype: not only token ids)
        model((batch if batch.dim() == 2 else batch.unsqueeze(0)).to(device))
        return
    try:
        inputs = model_inputs(batch, device)
    except TypeError as exc:
        raise TypeError(f"calibration {exc}") from None
    model(**inputs)


def hash_batch(batch, h) -> int:
    """Feeds a calibration batch (keys, dtypes, shapes, bytes) into the hash ``h``; returns its token
    count: batch x sequence of ``input_ids``, else of its first tensor."""
    items = sorted(batch.items()) if isinstance(batch, Mapping) else [("input_ids", batch)]
    tokens = None
    for key, value in items:
        h.update(str(key).encode())
        if not isinstance(value, torch.Tensor):
            h.update(repr(value).encode())
            if key == "input_ids" and isinstance(value, (list, tuple)):  # a `datasets` row
                tokens = torch.tensor(value).numel()
            continue
        t = value.detach().cpu().contiguous().reshape(-1) if value.dim() else value.detach().cpu().reshape(1)
        h.update(f"{value.dtype}{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
        if tokens is None or key == "input_ids":
            tokens = value.shape[0] * value.shape[1] if value.dim() >= 2 else value.numel()
    return tokens or 0


class StopForward(Exception):
    """Raised after the last block of a calibration pass: the rest of the forward (final norm, output
    head) is not needed."""


def raise_stop(*hook_args) -> None:
    """A forward hook (any signature) raising :class:`StopForward`."""
    raise StopForward


def _stop_after_the_blocks(model: nn.Module, layers: Mapping[str, nn.Module]) -> list:
    """When every layer of ``layers`` is inside the model's list of blocks
    (:func:`qruntime.plumbing.model.find_blocks`), a forward hook on the last block raising :class:`StopForward`, so a
    calibration pass skips the output head (for SmolLM2, a 576 x 49152 product per token); else no hook."""
    try:
        blocks = find_blocks(model).layers
    except ValueError:
        return []
    inside = {id(m) for block in blocks for m in block.modules()}
    if not layers or any(id(m) not in inside for m in layers.values()):
        return []
    return [blocks[-1].register_forward_hook(raise_stop)]


def collect_hessians(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable, progress: bool = True,
    fingerprint: dict | None = None,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Runs ``batches`` through ``model`` and returns, for each named layer, ``(H, rows)``: H float64
    [K, K] = X^T X / rows over every input row the layer saw. Layers the data never reached are absent.
    See :func:`collect_stats` (``fingerprint``, errors)."""
    return collect_stats(model, layers, batches, progress=progress, fingerprint=fingerprint)[0]


@torch.no_grad()
def collect_stats(
    model: nn.Module, layers: Mapping[str, nn.Module], batches: Iterable, *, hessian: bool = True,
    absmax: bool = False, samples: int = 0, progress: bool = True, fingerprint: dict | None = None,
    precision: torch.dtype | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, int]], dict[str, torch.Tensor]]:
    """One pass of ``batches`` through ``model`` collecting, per named layer's input X:
    ``hessian``: ``(X^T X / rows, rows)`` float64 [K, K] (GPTQ); ``absmax``: max_rows |X| float32 [K]
    (SmoothQuant), and with ``samples`` > 0 also up to that many rows of X, spread over the batches,
    under the key ``"<name>#rows"`` (SmoothQuant's alpha search). Layers the data never reached are
    absent.

    ``fingerprint``, if given, is filled with what identifies the data: ``batches``, ``tokens`` and the
    ``sha256`` of every batch's tensors (dtype, shape, bytes) in order, so a report says which data
    produced a model.

    ``precision``: the dtype of the forward's matmuls, X^T X included (:func:`forward_dtype`; None: the
    model's). The sums of X^T X are float32 either way.

    Raises:
        ValueError: no batch at all, or a non-finite activation (named by layer).
    """
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    peaks: dict[str, torch.Tensor] = {}
    # Layers fed the same tensor (q/k/v, gate/up) share one X^T X product per batch: the last input seen
    # is kept alive with its version counter, so identity plus version means the same values.
    last: list = [None, -1, None]  # [input tensor, its _version, X^T X]

    def make_hook(name: str):
        def hook(module, inputs, output):
            src = inputs[0]
            x = src.detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration: non-finite activations at the input of layer {name!r}")
            if absmax:
                peak = x.abs().amax(dim=0)
                peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)
            if samples:
                kept = peaks.get(f"{name}#rows")
                have = 0 if kept is None else kept.shape[0]
                if have < samples:  # every 8th row of each batch until full: spread over the text
                    new = x[::8][: samples - have].cpu()
                    peaks[f"{name}#rows"] = new if kept is None else torch.cat([kept, new])
            if hessian:
                if name not in sums:
                    sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
                    rows[name] = 0
                version = getattr(src, "_version", -1)
                if last[0] is not src or last[1] != version:
                    last[:] = [src, version, x.t() @ x]
                sums[name].add_(last[2])
                rows[name] += x.shape[0]

        return hook

    device = execution_device(model)
    handles = [module.register_forward_hook(make_hook(name)) for name, module in layers.items()]
    handles += _stop_after_the_blocks(model, layers)
    n_batches = tokens = 0
    digest = hashlib.sha256()
    try:
        for batch in tqdm(batches, desc="calibrate", unit="batch", disable=not progress):
            try:
                with autocast(device, precision):
                    _run(model, batch, device)
            except StopForward:
                pass
            tokens += hash_batch(batch, digest)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        last.clear()
    if n_batches == 0:
        raise ValueError("calib_data yielded no batches")
    if fingerprint is not None:
        fingerprint.update(batches=n_batches, tokens=tokens, sha256=digest.hexdigest())
    home = home_device(model)  # onloading (qruntime.plumbing.offload): the statistics leave the execution device
    return ({name: ((sums[name].to(torch.float64) / rows[name]).to(home), rows[name]) for name in sums},
            {name: peak.to(home) for name, peak in peaks.items()})


def calibration_inputs(model: nn.Module, batch) -> dict:
    """The keyword arguments of ``model``'s forward for one batch (input ids, or a dict of tensors), on its
    execution device, the KV cache off."""
    kwargs = model_inputs(batch, execution_device(model))
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs
