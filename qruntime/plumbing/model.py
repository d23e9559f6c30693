"""Model plumbing shared by every stage that runs a model: where its repeated blocks are, how a batch
becomes its forward's arguments, what its output's logits are, and which precision its forwards run in.

It imports nothing of qruntime: calibration, the block-by-block passes, offloading, distillation and the
accuracy budget all build on it.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Blocks", "find_blocks", "model_inputs", "first", "model_forward", "logits_of", "token_logprobs", "model_kind",
           "cpu_native_bf16", "autocast_dtype", "autocast"]


@dataclass
class Blocks:
    """The repeated blocks of a model: ``parent.<attr>`` is the ``nn.ModuleList``, named ``path``."""

    path: str
    parent: nn.Module
    attr: str

    @property
    def layers(self) -> nn.ModuleList:
        return getattr(self.parent, self.attr)

    def __len__(self) -> int:
        return len(self.layers)


def find_blocks(model: nn.Module, path: str | None = None) -> Blocks:
    """The list of repeated blocks of ``model``.

    With ``path`` (e.g. ``"model.layers"``), that submodule, which must be an ``nn.ModuleList``. Else the
    ``nn.ModuleList`` whose modules are all of one class and whose length is the config's
    ``num_hidden_layers`` (without a config: the largest such list by parameter count).

    Raises:
        ValueError: no such list, or several (an encoder-decoder: pass ``path``).
    """
    if path is not None:
        try:
            target = model.get_submodule(path)
        except AttributeError as e:
            raise ValueError(f"blocks path {path!r}: not a submodule of {type(model).__name__}") from e
        if not isinstance(target, nn.ModuleList) or len(target) == 0:
            raise ValueError(f"blocks path {path!r}: is a {type(target).__name__}, expected a non-empty nn.ModuleList")
        parent_name, _, attr = path.rpartition(".")
        return Blocks(path, model.get_submodule(parent_name) if parent_name else model, attr)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(c) for c in m}) == 1 and name
    ]
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if depth is not None:
        matching = [(n, m) for n, m in candidates if len(m) == depth]
        if not matching:
            raise ValueError(
                f"{type(model).__name__}: no nn.ModuleList of {depth} identical blocks (config.num_hidden_layers); "
                f"lists found: {[(n, len(m)) for n, m in candidates][:8]}; pass the blocks path"
            )
        if len(matching) > 1:
            raise ValueError(
                f"{type(model).__name__}: several lists of {depth} blocks: {[n for n, _ in matching]}; "
                "pass the path of the one to shorten"
            )
        name = matching[0][0]
    elif candidates:
        name = max(candidates, key=lambda c: sum(p.numel() for p in c[1].parameters()))[0]
    else:
        raise ValueError(f"{type(model).__name__}: no nn.ModuleList of identical blocks found")
    return find_blocks(model, name)


def model_inputs(batch, device: torch.device) -> dict:
    """The keyword arguments of a model's forward for one batch: input ids [batch, seq] (a LongTensor), or a
    dict of model keyword arguments (lists of ids, as a `datasets` row holds them, become tensors), on
    ``device``."""
    if isinstance(batch, torch.Tensor):
        ids = batch if batch.dim() == 2 else batch.unsqueeze(0)
        if ids.dtype != torch.long:
            raise TypeError(f"batch of dtype {ids.dtype}: input ids must be int64 (torch.long)")
        return {"input_ids": ids.to(device)}
    if isinstance(batch, Mapping):
        if "input_ids" not in batch and "inputs_embeds" not in batch:
            raise ValueError(f"batch keys {sorted(batch)}: need 'input_ids'")
        out = {}
        for key, value in batch.items():
            if isinstance(value, str):
                raise TypeError(f"batch key {key!r} holds text: tokenize first (batches are token ids), or drop "
                                "the text column of the dataset")
            if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, list, tuple)) for v in value):
                value = torch.tensor(value)  # a row of a `datasets` dataset: lists of ids
                value = value.unsqueeze(0) if value.dim() == 1 else value
            out[key] = value.to(device) if isinstance(value, torch.Tensor) else value
        return out
    raise TypeError(
        f"batch of type {type(batch).__name__}: expected a LongTensor of input ids [batch, seq] or a dict "
        "of model keyword arguments"
    )


def first(x):
    """The first element of a module's tuple output (the hidden states), or the output itself."""
    return x[0] if isinstance(x, (tuple, list)) else x


def model_forward(model: nn.Module, inputs: dict, attentions: bool = False):
    """``model(**inputs)`` with the KV cache off (and attention maps on, if asked)."""
    kwargs = dict(inputs)
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    if attentions:
        kwargs["output_attentions"] = True
    return model(**kwargs)


def logits_of(out) -> torch.Tensor | None:
    """The ``logits`` of a model output, or None (an encoder's base model has none)."""
    logits = getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``logits`` [..., N, V] (in float32) and, of each, its target's: ``targets``
    [..., N] (for next-token scoring, the logits at positions 0..T-2 and the tokens 1..T-1). The one place
    the evaluations and the accuracy budget turn logits into token log-likelihoods."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return logp, logp.gather(-1, targets[..., None]).squeeze(-1)


def model_kind(config) -> str:
    """``"causal-lm"`` or ``"encoder"`` for an HF config (by its architectures, else its model type)."""
    archs = getattr(config, "architectures", None) or []
    if archs:
        return "causal-lm" if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) else "encoder"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", "")
    causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "causal-lm" if causal else "encoder"


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> bool:
    """This CPU multiplies bf16 in hardware (AVX512_BF16 or AMX-BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a setting ``"off"`` / ``"bf16"`` / ``"auto"`` (bf16 where ``device`` runs it
    natively) on ``device``; None: no autocast."""
    if setting == "off":
        return None
    if setting == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_native_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or no autocast for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
