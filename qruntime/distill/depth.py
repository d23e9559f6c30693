"""Model surgery and hooks shared by the block selection, the student and the trainer: a model with some
blocks left out (its config updated), the blocks' hidden states of one forward, the device of a model.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from qruntime.plumbing.model import Blocks, first, model_kind

__all__ = []


def _depth_config_updates(config, num_layers: int, keep: Sequence[int]) -> dict:
    """Config attributes to change for a model that keeps blocks ``keep`` of ``num_layers``: the depth,
    and every per-layer list (e.g. ``layer_types``) subset to the kept blocks."""
    updates = {"num_hidden_layers": len(keep)}
    for key, value in config.to_dict().items():
        if isinstance(value, (list, tuple)) and len(value) == num_layers and key not in ("architectures",):
            updates[key] = type(value)(value[i] for i in keep)
    return updates


def _set_config(config, updates: dict) -> dict:
    old = {k: getattr(config, k) for k in updates}
    for k, v in updates.items():
        setattr(config, k, v)
    return old


@contextlib.contextmanager
def _shortened(model: nn.Module, blocks: Blocks, keep: Sequence[int]):
    """The model runs only blocks ``keep`` inside the ``with`` (no copy; no KV cache)."""
    full = blocks.layers
    config = getattr(model, "config", None)
    old = _set_config(config, _depth_config_updates(config, len(full), keep)) if config is not None else {}
    shortened = nn.ModuleList([full[i] for i in keep])
    shortened.training = full.training
    setattr(blocks.parent, blocks.attr, shortened)
    try:
        yield
    finally:
        setattr(blocks.parent, blocks.attr, full)
        if config is not None:
            _set_config(config, old)


@contextlib.contextmanager
def _capture(blocks: Blocks, inputs: bool = False):
    """Records each block's output (and input) hidden states [B, T, H] of one forward, in block order."""
    store: dict[str, list] = {"in": [], "out": []}

    def hook(module, args, kwargs, output):
        if inputs:
            store["in"].append(args[0] if args else kwargs["hidden_states"])
        store["out"].append(first(output))

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks.layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _is_causal(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if config is None:
        return False
    return model_kind(config) == "causal-lm"


def _replace_hidden(state: torch.Tensor, module, args, kwargs):
    if args:
        return (state, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": state}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _check_depth(num_layers, depth: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers={num_layers!r}: must be an int")
    if not 1 <= num_layers < depth:
        raise ValueError(f"num_layers={num_layers}: must be in [1, {depth - 1}] (the teacher has {depth} blocks)")

