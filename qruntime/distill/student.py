"""The student (:func:`make_student`): the kept blocks copied from the teacher into a new model with its
``layer_idx`` renumbered and its config updated, so ``generate`` and ``save_pretrained`` work.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

from torch import nn

from .config import check_keep
from .depth import _depth_config_updates, _set_config
from .selection import choose_layers
from qruntime.plumbing.model import find_blocks

__all__ = ["make_student"]


def make_student(
    model: nn.Module,
    num_layers: int | None = None,
    keep: Sequence[int] | None = None,
    *,
    method: str = "single",
    data: Iterable | None = None,
    blocks: str | None = None,
    progress: bool = True,
) -> nn.Module:
    """A copy of ``model`` with fewer blocks: those in ``keep``, or ``num_layers`` chosen by ``method``
    on ``data`` (:func:`choose_layers`). The teacher is left untouched; the student's blocks are copies.

    The student's ``layer_idx`` attributes (KV-cache slots) are renumbered 0..n-1 and its config's depth
    and per-layer lists are updated, so ``generate`` and ``save_pretrained`` work; the config records
    ``qruntime_student = {"teacher_num_layers", "kept_layers", "selection"}``. With ``num_layers`` the
    :class:`LayerChoice` is at ``student.qruntime_layer_choice``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    found = find_blocks(model, blocks)
    depth = len(found)
    if (num_layers is None) == (keep is None):
        raise ValueError(f"num_layers={num_layers!r}, keep={keep!r}: give exactly one of them")
    choice = None
    if keep is not None:
        keep = list(check_keep(keep))
        if keep[-1] >= depth:
            raise ValueError(f"keep={keep}: block index {keep[-1]} is out of range (the teacher has {depth} blocks: 0..{depth - 1})")
        if len(keep) == depth:
            raise ValueError(f"keep={keep}: keeps all {depth} blocks; a student must be shallower than its teacher")
        method = "given"
    else:
        choice = choose_layers(model, num_layers, method, data, blocks=found, progress=progress)
        keep = choice.keep
    full = found.layers
    setattr(found.parent, found.attr, nn.ModuleList())
    memo: dict = {}  # one memo: the kept blocks refer to the student's config, not to copies of it
    try:  # copy everything but the blocks, then only the kept blocks
        student = copy.deepcopy(model, memo)
        kept = [copy.deepcopy(full[i], memo) for i in keep]
    finally:
        setattr(found.parent, found.attr, full)
    parent_name = found.path.rpartition(".")[0]
    layers = nn.ModuleList(kept)
    layers.training = full.training  # a new ModuleList starts in train mode, whatever the model's
    setattr(student.get_submodule(parent_name) if parent_name else student, found.attr, layers)
    for j, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = j
    config = getattr(student, "config", None)
    if config is not None:
        _set_config(config, _depth_config_updates(config, depth, keep))
        config.qruntime_student = {"teacher_num_layers": depth, "kept_layers": list(keep), "selection": method}
    if choice is not None:
        student.qruntime_layer_choice = choice
    return student

