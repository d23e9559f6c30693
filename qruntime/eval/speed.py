"""End-to-end speed of (compressed) models, measured side by side.

The machines this runs on are shared and drift: every round measures every model once, and medians
over the rounds are reported, so ratios between models are meaningful even when absolute times are not.

A causal LM runs on one of two paths, and each result says which: ``"hf"``, the model's own forward
(what ``model.generate`` runs), or ``"qruntime"``, the :class:`~qruntime.runtime.Decoder` (prefill and
decoding steps); ``"auto"`` takes the decoder where it reads the model and says why not where it does not.
"""
from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Mapping

import torch
from torch import nn

from qruntime.runtime import Decoder, UnsupportedModelError

__all__ = ["PATHS", "runner", "prefill_tokens_per_s", "decode_tokens_per_s", "encode_sentences_per_s", "compare_causal_lm", "compare_encoder"]


@torch.no_grad()
def prefill_tokens_per_s(model: nn.Module | Decoder, ids: torch.Tensor) -> float:
    """tokens/s of one prefill pass over ``ids`` [1, T] (logits of the last position only, as generate() does)."""
    if isinstance(model, Decoder):
        model.reset()
        t0 = time.perf_counter()
        model.prefill(ids)
        return ids.shape[1] / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    return ids.shape[1] / (time.perf_counter() - t0)


def _cache_name(model: nn.Module) -> str:
    """The KV cache's keyword and output field: ``cache`` in transformers 5.24+, ``past_key_values``
    before (still accepted there, with a deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode_tokens_per_s(model: nn.Module | Decoder, prompt: torch.Tensor, steps: int) -> float:
    """tokens/s of ``steps`` greedy decoding steps with the KV cache after ``prompt`` [1, P]."""
    if isinstance(model, Decoder):
        model.reset()
        tok = model.prefill(prompt).argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            tok = model.step(tok).argmax(-1)
        return steps / (time.perf_counter() - t0)
    name = _cache_name(model)
    out = model(prompt, use_cache=True)
    past, tok = getattr(out, name), out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, use_cache=True, **{name: past})
        past, tok = getattr(out, name), out.logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - t0)


@torch.no_grad()
def encode_sentences_per_s(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> float:
    """sentences/s of one encoder forward over a tokenized batch."""
    t0 = time.perf_counter()
    model(**batch)
    return len(batch["input_ids"]) / (time.perf_counter() - t0)


def _check(models: Mapping[str, nn.Module], rounds: int) -> None:
    if not models:
        raise ValueError("models: nothing to measure")
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: must be >= 1")


PATHS = ("hf", "qruntime", "auto")


def runner(model: nn.Module, path: str) -> tuple[nn.Module | Decoder, str]:
    """What runs ``model`` on ``path`` (:data:`PATHS`), and its description: ``"qruntime decoder"``,
    ``"HF forward"``, or ``"HF forward (<why the decoder does not read it>)"`` for ``"auto"``."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")
    if path == "hf":
        return model, "HF forward"
    try:
        return Decoder(model), "qruntime decoder"
    except UnsupportedModelError as exc:
        if path == "qruntime":
            raise
        return model, f"HF forward ({exc})"


def compare_causal_lm(
    models: Mapping[str, nn.Module], ids: torch.Tensor, prompt_len: int = 32, decode_steps: int = 32, rounds: int = 3,
    paths: str | Mapping[str, str] = "hf",
) -> dict[str, dict]:
    """Prefill (over ``ids`` [1, T]) and decode tokens/s of each model, in interleaved rounds, each on its
    path (one of :data:`PATHS` for all, or per model name).

    Returns ``{name: {"prefill_tok_s", "decode_tok_s", "prefill_tok_s_all", "decode_tok_s_all", "path"}}``
    (medians, every round's value, and what ran it: :func:`runner`).
    """
    _check(models, rounds)
    if ids.dim() != 2 or ids.shape[0] != 1 or not 0 < prompt_len <= ids.shape[1]:
        raise ValueError(f"ids: shape {tuple(ids.shape)}, prompt_len={prompt_len}: need [1, T] with 0 < prompt_len <= T")
    prompt = ids[:, :prompt_len]
    run = {name: runner(m, paths if isinstance(paths, str) else paths.get(name, "hf")) for name, m in models.items()}
    with torch.no_grad():
        for name, model in models.items():  # first-call work (CPU layouts, caches) is not timed
            model(ids[:, : min(8, ids.shape[1])])
            if isinstance(run[name][0], Decoder):
                decode_tokens_per_s(run[name][0], ids[:, :2], 2)
    prefill: dict[str, list[float]] = {name: [] for name in models}
    decode: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name in models:
            prefill[name].append(prefill_tokens_per_s(run[name][0], ids))
            decode[name].append(decode_tokens_per_s(run[name][0], prompt, decode_steps))
    return {
        name: {
            "prefill_tok_s": statistics.median(prefill[name]),
            "decode_tok_s": statistics.median(decode[name]),
            "prefill_tok_s_all": prefill[name],
            "decode_tok_s_all": decode[name],
            "path": run[name][1],
        }
        for name in models
    }


def compare_encoder(models: Mapping[str, nn.Module], batch: Mapping[str, torch.Tensor], rounds: int = 3) -> dict[str, dict]:
    """Forward sentences/s of each encoder on one tokenized batch, in interleaved rounds (medians)."""
    _check(models, rounds)
    with torch.no_grad():
        for model in models.values():
            model(**batch)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            runs[name].append(encode_sentences_per_s(model, batch))
    return {name: {"sentences_s": statistics.median(v), "sentences_s_all": v} for name, v in runs.items()}
