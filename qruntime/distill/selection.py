"""Which blocks a shallower student keeps (:func:`choose_layers`): measured on data (``greedy``, ``single``,
``influence``, ``angular``) or naive (``uniform``, ``first``, ``middle``).
"""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import SELECTION_METHODS
from .depth import _capture, _check_depth, _device, _replace_hidden, _shortened
from .losses import _cosine_distance, _kl_rows, _masked_mean, _token_mask
from qruntime.plumbing.model import Blocks, find_blocks, logits_of, model_forward, model_inputs

__all__ = ["MEASURED", "LayerChoice", "choose_layers"]


MEASURED = ("greedy", "single", "influence", "angular")


@dataclass
class LayerChoice:
    """The kept blocks and how they were chosen.

    ``scores``: per block (``single``: divergence when that block alone is dropped; ``influence``:
    1 - cos(input, output)), per start of the dropped run (``angular``), or per removal step (``greedy``:
    the divergence after each drop, in drop order). ``divergence``: of the chosen student on the
    selection data (KL(teacher || student) in nats per token for models with logits, else 1 - cosine of
    the last hidden states), None without data."""

    keep: list[int]
    method: str
    num_teacher_layers: int
    scores: dict = field(default_factory=dict)
    divergence: float | None = None
    dropped_order: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class _Divergence:
    """Divergence of the model run with a subset of its blocks from the full model, on fixed batches.
    The full model's outputs are computed once (log-probabilities stored in float16, or last hidden
    states)."""

    def __init__(self, model: nn.Module, blocks: Blocks, batches: list, progress: bool):
        self.model, self.blocks, self.device = model, blocks, _device(model)
        self.batches = [model_inputs(b, self.device) for b in batches]
        self.masks = [_token_mask(b) for b in self.batches]
        self.reference = []
        self.block_io: list[tuple[list, list]] = []  # per batch: inputs and outputs of every block
        with torch.no_grad():
            for inputs in tqdm(self.batches, desc="teacher outputs", disable=not progress):
                with _capture(blocks, inputs=True) as cap:
                    out = model_forward(model, inputs)
                self.block_io.append(([h.float() for h in cap["in"]], [h.float() for h in cap["out"]]))
                self.reference.append(self._summary(out, cap["out"]))

    @staticmethod
    def _summary(out, block_outputs) -> torch.Tensor:
        logits = logits_of(out)
        if logits is not None:
            return F.log_softmax(logits.float(), dim=-1).to(torch.float16)
        hidden = getattr(out, "last_hidden_state", None)
        return (hidden if hidden is not None else block_outputs[-1]).float()

    @torch.no_grad()
    def __call__(self, keep: Sequence[int], start: list[torch.Tensor] | None = None) -> float:
        """Divergence of the model that runs blocks ``keep``. ``start``: per batch, the input hidden
        states of block ``keep[0]`` computed elsewhere; the embeddings' output is then replaced by them
        (the blocks before are shared with a subset already run)."""
        total = weight = 0.0
        with _shortened(self.model, self.blocks, keep):
            for b, (inputs, mask, ref) in enumerate(zip(self.batches, self.masks, self.reference)):
                handle = None
                if start is not None:
                    handle = self.blocks.layers[0].register_forward_pre_hook(
                        functools.partial(_replace_hidden, start[b]), with_kwargs=True)
                try:
                    with _capture(self.blocks) as cap:
                        out = model_forward(self.model, inputs)
                finally:
                    if handle is not None:
                        handle.remove()
                cur = self._summary(out, cap["out"])
                if ref.dtype == torch.float16:  # KL(full || subset) per token
                    per_token = _kl_rows(ref.float(), cur.float())
                else:
                    per_token = 1 - F.cosine_similarity(ref, cur, dim=-1)
                total += (per_token * mask).sum().item()
                weight += mask.sum().item()
        return total / max(weight, 1.0)

    @torch.no_grad()
    def drop_scores(self, keep: Sequence[int], bar=None) -> dict[int, float]:
        """The divergence of ``keep`` without each one of its blocks. The blocks before the dropped one
        run once for all candidates: one pass records every block's input, and each candidate runs
        only the blocks after it (about half the work of running each subset from the start)."""
        keep = list(keep)
        states = []
        with _shortened(self.model, self.blocks, keep):
            for inputs in self.batches:
                with _capture(self.blocks, inputs=True) as cap:
                    model_forward(self.model, inputs)
                states.append(cap["in"])
        scores = {}
        for p, block in enumerate(keep):
            tail = keep[p + 1 :]
            scores[block] = self(tail, start=[s[p] for s in states]) if tail else self(keep[:p])
            if bar is not None:
                bar.update(1)
        return scores


def _naive_keep(method: str, depth: int, num_layers: int) -> list[int]:
    if method == "uniform":
        return [i * depth // num_layers for i in range(num_layers)]
    if method == "first":
        return list(range(num_layers))
    drop = depth - num_layers  # "middle"
    start = (depth - drop) // 2
    return [i for i in range(depth) if not start <= i < start + drop]


def choose_layers(
    model: nn.Module,
    num_layers: int,
    method: str = "single",
    data: Iterable | None = None,
    *,
    blocks: str | Blocks | None = None,
    progress: bool = True,
) -> LayerChoice:
    """Which ``num_layers`` of the model's blocks a student keeps, by ``method`` (see
    :data:`qruntime.distill.config.SELECTION_METHODS`). Measured methods need ``data`` (batches of input ids
    [B, T] or dicts of model inputs); with data, the chosen subset's divergence is measured for every
    method, so naive and measured choices compare on the same numbers. The model is not modified."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"method={method!r}: must be one of {sorted(SELECTION_METHODS)}")
    blocks = blocks if isinstance(blocks, Blocks) else find_blocks(model, blocks)
    depth = len(blocks)
    _check_depth(num_layers, depth)
    batches = list(data) if data is not None else []
    if method in MEASURED and not batches:
        raise ValueError(f"selection method {method!r} is measured on data: pass data (batches of input ids)")
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        div = _Divergence(model, blocks, batches, progress) if batches else None
        choice = LayerChoice(keep=[], method=method, num_teacher_layers=depth)
        drop = depth - num_layers
        if method in ("uniform", "first", "middle"):
            choice.keep = _naive_keep(method, depth, num_layers)
        elif method == "influence":
            bi = []
            for i in range(depth):
                per = [_cosine_distance(ins[i], outs[i], m) for (ins, outs), m in zip(div.block_io, div.masks)]
                bi.append(torch.stack(per).mean().item())
            choice.scores = {str(i): s for i, s in enumerate(bi)}
            dropped = sorted(range(depth), key=lambda i: bi[i])[:drop]
            choice.keep = [i for i in range(depth) if i not in dropped]
        elif method == "angular":
            angles = {}
            for s in range(depth - drop + 1):
                per = []
                for (ins, outs), m in zip(div.block_io, div.masks):
                    a = ins[s]
                    b = ins[s + drop] if s + drop < depth else outs[-1]
                    cos = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1)
                    per.append(_masked_mean(torch.arccos(cos) / math.pi, m))
                angles[str(s)] = torch.stack(per).mean().item()
            choice.scores = angles
            s = int(min(angles, key=angles.get))
            choice.keep = [i for i in range(depth) if not s <= i < s + drop]
        elif method == "single":
            with tqdm(total=depth, desc="drop one block", disable=not progress) as bar:
                alone = div.drop_scores(range(depth), bar)
            choice.scores = {str(i): v for i, v in alone.items()}
            dropped = sorted(alone, key=alone.get)[:drop]
            choice.keep = [i for i in range(depth) if i not in dropped]
        else:  # greedy
            keep = list(range(depth))
            bar = tqdm(total=sum(depth - r for r in range(drop)), desc="greedy block removal", disable=not progress)
            for _ in range(drop):
                trial = div.drop_scores(keep, bar)
                best = min(trial, key=trial.get)
                keep.remove(best)
                choice.dropped_order.append(best)
                choice.scores[f"drop {best}"] = trial[best]
            bar.close()
            choice.keep = keep
        if method in ("influence", "single"):
            choice.dropped_order = sorted(set(range(depth)) - set(choice.keep))
        if div is not None:
            choice.divergence = div(choice.keep)
    finally:
        model.train(was_training)
    choice.seconds = time.perf_counter() - start
    return choice

