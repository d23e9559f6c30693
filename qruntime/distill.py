"""Depth distillation: a student with fewer blocks, copied from the teacher and trained to match it.

    student, report = qruntime.distill(teacher, 20, train_batches, DistillConfig(steps=300),
                                       eval_data=held_out_batches)
    print(report)

Three steps:

1. **Where the blocks are** (:func:`qruntime.plumbing.find_blocks`): the model's list of repeated blocks (Llama-family
   ``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``, ...), found as the one
   ``nn.ModuleList`` of identical modules whose length is ``config.num_hidden_layers``.
2. **Which blocks to keep** (:func:`choose_layers`): measured on data (``greedy``, ``single``,
   ``influence``, ``angular``) or naive (``uniform``, ``first``, ``middle``), see
   :data:`qruntime.config.SELECTION_METHODS`. :func:`make_student` copies the kept blocks into a new
   model, renumbers their ``layer_idx`` (KV caches) and updates the config, so ``generate`` and
   ``save_pretrained`` work.
3. **Training** (:func:`distill`): the student learns the teacher's outputs: ``T^2 * KL(teacher ||
   student)`` of the logits, optionally hidden-state MSE on mapped blocks (student block j <-> the
   teacher block it was copied from), cosine of the last hidden states (encoders), attention KL and
   next-token cross-entropy. AdamW, linear warm-up then cosine decay, gradient accumulation, bf16
   autocast where the device runs it natively, fixed masks (2:4 recovery), held-out evaluation.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import SELECTION_METHODS, DistillConfig, check_keep
from .plumbing import (Blocks, autocast, autocast_dtype, find_blocks, first, logits_of, model_forward, model_inputs,
                       model_kind)

__all__ = [
    "choose_layers",
    "LayerChoice",
    "make_student",
    "kd_loss",
    "distill",
    "DistillReport",
    "evaluate_student",
    "teacher_topk",
]

MEASURED = ("greedy", "single", "influence", "angular")


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


# --------------------------------------------------------------------------------------------------
# Running models: inputs, outputs, block hooks
# --------------------------------------------------------------------------------------------------


def _token_mask(inputs: dict) -> torch.Tensor:
    """float [B, T]: 1 for real tokens, 0 for padding."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.to(torch.float32)
    ref = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"][..., 0]
    return torch.ones(ref.shape[:2], dtype=torch.float32, device=ref.device)


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


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim, from log-probabilities: sum p (log p - log q)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_mean(1 - F.cosine_similarity(a.float(), b.float(), dim=-1), mask)


# --------------------------------------------------------------------------------------------------
# Which blocks to keep
# --------------------------------------------------------------------------------------------------


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


def _replace_hidden(state: torch.Tensor, module, args, kwargs):
    if args:
        return (state, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": state}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _naive_keep(method: str, depth: int, num_layers: int) -> list[int]:
    if method == "uniform":
        return [i * depth // num_layers for i in range(num_layers)]
    if method == "first":
        return list(range(num_layers))
    drop = depth - num_layers  # "middle"
    start = (depth - drop) // 2
    return [i for i in range(depth) if not start <= i < start + drop]


def _check_depth(num_layers, depth: int) -> None:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int):
        raise TypeError(f"num_layers={num_layers!r}: must be an int")
    if not 1 <= num_layers < depth:
        raise ValueError(f"num_layers={num_layers}: must be in [1, {depth - 1}] (the teacher has {depth} blocks)")


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
    :data:`qruntime.config.SELECTION_METHODS`). Measured methods need ``data`` (batches of input ids
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


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def kd_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    top_k: int | None = None,
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, averaged over the positions where
    ``mask`` [..] is 1 (all without a mask).

    ``student_logits`` [..., V]. ``teacher``: logits [..., V], or a pair ``(values, indices)`` [..., k]
    of the teacher's top-k logits (e.g. from :func:`teacher_topk`); with ``top_k`` the teacher's
    logits are cut to their top k. With top-k, p_teacher is renormalized over its k tokens and the KL
    is ``sum_k p_k (log p_k - log q_k)`` with the student's full-vocabulary log-probabilities q, which
    is >= 0 and 0 only when the student puts exactly p_k on those tokens. The teacher side is treated as
    a constant (no gradient flows to it)."""
    if isinstance(teacher, tuple):
        values, indices = teacher
    elif top_k is not None:
        values, indices = teacher.float().topk(min(top_k, teacher.shape[-1]), dim=-1)
    else:
        values, indices = teacher, None
    if values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"teacher shape {tuple(values.shape)} and student logits {tuple(student_logits.shape)} differ before the last dim")
    if indices is None:
        if values.shape[-1] != student_logits.shape[-1]:
            raise ValueError(
                f"teacher vocabulary {values.shape[-1]} != student vocabulary {student_logits.shape[-1]}"
            )
        vocab = values.shape[-1]
        per_pos = _ChunkedKL.apply(student_logits.reshape(-1, vocab), values.detach().reshape(-1, vocab), temperature)
        per_pos = per_pos.view(student_logits.shape[:-1])
    else:
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        t = F.log_softmax(values.float() / temperature, dim=-1)
        per_pos = _kl_rows(t, s.gather(-1, indices.long()))
    if mask is None:
        return temperature**2 * per_pos.mean()
    return temperature**2 * _masked_mean(per_pos, mask.to(per_pos.dtype))


class _ChunkedKL(torch.autograd.Function):
    """Per-row ``KL(softmax(t / T) || softmax(s / T))`` [R] of logits [R, V], computed a few rows at a
    time so each row's softmaxes stay in cache instead of streaming [R, V] float32 tensors through memory
    five times (at SmolLM2's 49,152-token vocabulary, 1,024 rows: the unfused loss took a quarter of a
    recovery step on the CPU). When ``s`` needs a gradient, the gradient of each row's KL with respect to
    ``s``, ``(softmax(s / T) - softmax(t / T)) / T``, is computed in the same pass and kept in ``s``'s
    dtype (what autograd would hand back for it); backward only scales it by the incoming per-row
    gradient. The teacher side gets no gradient."""

    ROWS = 16

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, temperature: float) -> torch.Tensor:
        work = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)  # float32 or float64
        out = torch.empty(s.shape[0], dtype=work, device=s.device)
        grad = torch.empty_like(s) if ctx.needs_input_grad[0] else None
        for i in range(0, s.shape[0], _ChunkedKL.ROWS):
            j = min(i + _ChunkedKL.ROWS, s.shape[0])
            s_log = F.log_softmax(s[i:j].to(work) / temperature, dim=-1)
            t_log = F.log_softmax(t[i:j].to(work) / temperature, dim=-1)
            p = t_log.exp()
            out[i:j] = (p * (t_log - s_log)).sum(-1)
            if grad is not None:
                grad[i:j] = (s_log.exp_().sub_(p)).div_(temperature)
        ctx.save_for_backward(grad)
        return out

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_rows.unsqueeze(-1).to(grad.dtype), None, None


def _hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum ||s - t||^2 / sum ||t||^2 over the real tokens: scale-free."""
    m = mask.unsqueeze(-1)
    return (((student.float() - teacher.float()) ** 2) * m).sum() / ((teacher.float() ** 2) * m).sum().clamp(min=1e-12)


def _attention_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of attention rows [B, heads, T, T], averaged over real query tokens."""
    t, s = teacher.float().clamp(min=1e-12), student.float().clamp(min=1e-12)
    per_row = (t * (t.log() - s.log())).sum(-1).mean(1)  # [B, T]
    return _masked_mean(per_row, mask)


@dataclass(frozen=True)
class _Weights:
    kd: float
    hidden: float
    cosine: float
    attention: float
    ce: float


def _resolve_weights(cfg: DistillConfig, has_logits: bool, causal: bool, mapped: bool) -> _Weights:
    w = _Weights(cfg.alpha_kd, cfg.alpha_hidden, cfg.alpha_cosine, cfg.alpha_attention, cfg.alpha_ce)
    if not has_logits and w == _Weights(1.0, 0.0, 0.0, 0.0, 0.0) and mapped:
        return _Weights(0.0, 1.0, 1.0, 0.0, 0.0)  # the default loss, for an encoder (see DistillConfig)
    if not has_logits and (w.kd or w.ce):
        if not (w.hidden or w.cosine or w.attention):
            raise ValueError(
                "the model returns no logits (an encoder), so alpha_kd/alpha_ce have nothing to match; "
                "use DistillConfig(..., alpha_kd=0, alpha_cosine=1, alpha_hidden=1)"
            )
        raise ValueError(f"alpha_kd={w.kd}, alpha_ce={w.ce}: the model returns no logits (an encoder); set them to 0")
    if w.ce and not causal:
        raise ValueError(f"alpha_ce={w.ce}: next-token cross-entropy needs a causal LM")
    if (w.hidden or w.attention) and not mapped:
        raise ValueError(
            "alpha_hidden/alpha_attention need to know which teacher block each student block came from: "
            "build the student with make_student (it records config.qruntime_student) or give it the teacher's depth"
        )
    return w


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@dataclass
class DistillReport:
    """What :func:`distill` did. ``before``/``after``: metrics of the student on the held-out batches
    before and after training (see :func:`evaluate_student`), ``teacher``: the teacher's on the same
    batches; ``history``: the same metrics every ``eval_every`` steps, with ``step``, ``train_tokens``
    and ``seconds`` (``tokens`` is the held-out count); ``losses``: (step, mean loss of the step) per
    optimizer step."""

    teacher_layers: int
    student_layers: int
    kept_layers: list[int] | None
    selection: dict | None
    loss_weights: dict
    steps: int = 0
    tokens: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    selection_seconds: float = 0.0
    autocast: str = "off"
    trainable_parameters: int = 0
    stopped_early: str | None = None
    teacher: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d

    def table(self) -> str:
        sel = self.selection or {}
        lines = [
            f"qruntime.distill: {self.teacher_layers} -> {self.student_layers} blocks"
            + (f", kept {self.kept_layers}" if self.kept_layers is not None else "")
            + (f" (selection: {sel.get('method')}, {sel.get('seconds', 0):.1f} s)" if sel else ""),
            f"training: {self.steps} steps, {self.tokens} tokens ({self.epochs:.2f} epochs), {self.seconds:.1f} s, "
            f"{self.tokens_per_second:.0f} tokens/s, autocast {self.autocast}, "
            f"{self.trainable_parameters / 1e6:.2f} M trainable parameters"
            + (f"; stopped early: {self.stopped_early}" if self.stopped_early else ""),
            "loss: " + " + ".join(f"{v:g} * {k}" for k, v in self.loss_weights.items() if v),
        ]
        if self.after:
            keys = [k for k in self.after if k != "tokens"]
            lines.append(f"{'held-out':<10}" + "".join(f"{k:>16}" for k in keys))
            for name, row in (("teacher", self.teacher), ("before", self.before), ("after", self.after)):
                lines.append(f"{name:<10}" + "".join(
                    f"{row[k]:>16.4f}" if isinstance(row.get(k), float) else f"{'-':>16}" for k in keys))
        else:
            lines.append("no held-out data: pass eval_data to measure the student")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def teacher_topk(teacher: nn.Module, batches: Iterable, top_k: int, progress: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The teacher's top-k logits per token of each batch: ``(values float32, indices int32)``
    [B, T, k], on the CPU. ``top_k * 8`` bytes per token instead of ``vocab * 4``."""
    device = _device(teacher)
    out = []
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(list(batches), desc="teacher top-k", disable=not progress):
                logits = logits_of(model_forward(teacher, model_inputs(batch, device)))
                if logits is None:
                    raise ValueError("teacher returns no logits: the top-k cache is for models with logits")
                v, i = logits.float().topk(min(top_k, logits.shape[-1]), dim=-1)
                out.append((v.cpu(), i.to(torch.int32).cpu()))
    finally:
        teacher.train(was_training)
    return out


@torch.no_grad()
def evaluate_student(teacher: nn.Module, student: nn.Module, batches: Iterable, *, teacher_metrics: bool = False) -> dict:
    """Held-out metrics of ``student`` against ``teacher`` on ``batches``.

    Models with logits: ``kl`` (KL(teacher || student), nats per token, T=1) and ``top1_agreement``;
    causal LMs also ``perplexity`` of the next token of the text (the student's; the teacher's with
    ``teacher_metrics``). Encoders: ``cosine`` of mean-pooled, normalized last hidden states (sentence
    embeddings) and ``token_cosine``. Always ``tokens``."""
    device = _device(student)
    causal = _is_causal(student)
    sums: dict[str, float] = {}
    n_tok = n_seq = n_next = 0
    modes = _modes(teacher) + _modes(student)
    teacher.eval()
    student.eval()
    try:
        for batch in batches:
            inputs = model_inputs(batch, device)
            mask = _token_mask(inputs)
            t_out, s_out = model_forward(teacher, inputs), model_forward(student, inputs)
            t_logits, s_logits = logits_of(t_out), logits_of(s_out)
            tokens = mask.sum().item()
            n_tok += tokens
            if t_logits is not None and s_logits is not None:
                t = F.log_softmax(t_logits.float(), -1)
                s = F.log_softmax(s_logits.float(), -1)
                sums["kl"] = sums.get("kl", 0.0) + (_kl_rows(t, s) * mask).sum().item()
                agree = (t.argmax(-1) == s.argmax(-1)).float()
                sums["top1_agreement"] = sums.get("top1_agreement", 0.0) + (agree * mask).sum().item()
                if causal and "input_ids" in inputs:
                    target = inputs["input_ids"][:, 1:]
                    m = mask[:, 1:] * mask[:, :-1]
                    sums["nll"] = sums.get("nll", 0.0) + (-(s[:, :-1].gather(-1, target[..., None])[..., 0]) * m).sum().item()
                    if teacher_metrics:
                        sums["teacher_nll"] = sums.get("teacher_nll", 0.0) + (-(t[:, :-1].gather(-1, target[..., None])[..., 0]) * m).sum().item()
                    n_next += m.sum().item()
            else:
                th = getattr(t_out, "last_hidden_state", None)
                sh = getattr(s_out, "last_hidden_state", None)
                if th is None or sh is None:
                    raise ValueError("models return neither logits nor last_hidden_state: nothing to compare")
                sums["token_cosine"] = sums.get("token_cosine", 0.0) + (F.cosine_similarity(th.float(), sh.float(), dim=-1) * mask).sum().item()
                m = mask.unsqueeze(-1)
                te = F.normalize((th.float() * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
                se = F.normalize((sh.float() * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)
                sums["cosine"] = sums.get("cosine", 0.0) + F.cosine_similarity(te, se, dim=-1).sum().item()
                n_seq += th.shape[0]
    finally:
        _restore(modes)
    if n_tok == 0:
        raise ValueError("eval_data yielded no tokens")
    result: dict[str, float] = {}
    if "kl" in sums:
        result["kl"] = sums["kl"] / n_tok
        result["top1_agreement"] = sums["top1_agreement"] / n_tok
    if "nll" in sums and n_next:
        result["perplexity"] = math.exp(sums["nll"] / n_next)
        if teacher_metrics:
            result["teacher_perplexity"] = math.exp(sums["teacher_nll"] / n_next)
    if "cosine" in sums:
        result["cosine"] = sums["cosine"] / n_seq
        result["token_cosine"] = sums["token_cosine"] / n_tok
    result["tokens"] = float(n_tok)
    return result


def _layer_map(teacher_depth: int, student: nn.Module, student_depth: int) -> list[int] | None:
    """Teacher block index of each student block, when known."""
    record = getattr(getattr(student, "config", None), "qruntime_student", None)
    if (isinstance(record, Mapping) and len(record.get("kept_layers", [])) == student_depth
            and record.get("teacher_num_layers") == teacher_depth):
        return list(record["kept_layers"])
    if student_depth == teacher_depth:
        return list(range(teacher_depth))
    return None


def _check_vocab(teacher: nn.Module, student: nn.Module) -> None:
    tv = getattr(getattr(teacher, "config", None), "vocab_size", None)
    sv = getattr(getattr(student, "config", None), "vocab_size", None)
    if tv is not None and sv is not None and tv != sv:
        raise ValueError(f"teacher vocab_size={tv} != student vocab_size={sv}: the student must share the teacher's tokenizer")


def _check_masks(student: nn.Module, masks: Mapping[str, torch.Tensor] | None) -> dict[str, tuple[nn.Parameter, torch.Tensor]]:
    if not masks:
        return {}
    params = dict(student.named_parameters())
    out = {}
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"masks: {name!r} is not a parameter of the student")
        p = params[name]
        if tuple(mask.shape) != tuple(p.shape):
            raise ValueError(f"masks[{name!r}]: shape {tuple(mask.shape)} != parameter shape {tuple(p.shape)}")
        out[name] = (p, mask.to(device=p.device, dtype=p.dtype))
    return out


def _lr_factor(cfg: DistillConfig, step: int, elapsed: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``; with ``max_seconds``
    the decay follows whichever of steps and time is further along, so a time-capped run still ends
    at the low learning rate."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    done = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.max_seconds is not None:
        done = max(done, elapsed / cfg.max_seconds)
    done = min(1.0, done)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * done))


def _frozen_embeddings(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        module = fn() if callable(fn) else None
        if isinstance(module, nn.Module):
            params += list(module.parameters())
    return params


def distill(
    teacher: nn.Module,
    student_or_num_layers: nn.Module | int | Sequence[int] | None,
    data: Iterable,
    config: DistillConfig | None = None,
    *,
    eval_data: Iterable | None = None,
    selection_data: Iterable | None = None,
    masks: Mapping[str, torch.Tensor] | None = None,
    blocks: str | None = None,
    progress: bool = True,
) -> tuple[nn.Module, DistillReport]:
    """Trains a student to reproduce ``teacher``; returns ``(student, report)``.

    Args:
        teacher: an HF model (causal LM, encoder, classifier); not modified (run under no_grad, in eval mode).
        student_or_num_layers: a student ``nn.Module`` (e.g. a pruned copy: the 2:4 recovery), a number
            of blocks (the student is built with :func:`make_student`, blocks chosen by
            ``config.selection`` on ``config.selection_batches`` batches spread evenly over ``data``), a list of
            block indices to keep, or None to use ``config.num_layers`` / ``config.keep``.
        data: training batches: LongTensors of input ids [B, T] or dicts of model inputs (with
            ``attention_mask`` for padded text). Cycled when ``steps * grad_accum`` exceeds them.
        config: :class:`DistillConfig` (loss weights, optimizer, schedule, autocast, seed, ...).
        eval_data: held-out batches, evaluated before, every ``config.eval_every`` steps, and after.
        selection_data: batches for a measured block selection (default: ``config.selection_batches``
            batches spread evenly over ``data``, the middle one of each equal stretch, so that data sorted
            by length, as :func:`qruntime.calibrate.sentence_batches` gives it, is measured on short and
            long sentences alike, not only on its first, shortest, batches).
        masks: parameter name -> 0/1 tensor of the same shape; masked entries stay exactly zero
            (gradients and weights are masked every step), e.g. 2:4 sparsity masks.
        blocks: the path of the block list when it cannot be found automatically.
        progress: progress bars (loss and tokens/s).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected a torch.nn.Module, got {type(teacher).__name__}")
    cfg = config
    arg = student_or_num_layers
    if cfg is None:
        cfg = DistillConfig(num_layers=arg) if isinstance(arg, int) and not isinstance(arg, bool) else DistillConfig()
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"config={cfg!r}: must be a DistillConfig")
    if isinstance(arg, int) and not isinstance(arg, bool) and cfg.num_layers not in (None, arg):
        raise ValueError(f"student_or_num_layers={arg} but config.num_layers={cfg.num_layers}: give one")
    batches = list(data)
    if not batches:
        raise ValueError("data yielded no batches")
    if not cfg.shuffle:
        _warn_if_sorted(batches)
    eval_batches = list(eval_data) if eval_data is not None else []
    t_blocks = find_blocks(teacher, blocks)
    depth = len(t_blocks)
    choice = None
    start = time.perf_counter()
    if isinstance(arg, nn.Module):
        student = arg
    else:
        if arg is None:
            num_layers, keep = cfg.num_layers, cfg.keep
            if num_layers is None and keep is None:
                raise ValueError("no student: pass a model, a number of blocks or a keep list, or set config.num_layers/keep")
        elif isinstance(arg, int) and not isinstance(arg, bool):
            num_layers, keep = arg, None
        else:
            num_layers, keep = None, arg
        if num_layers is not None:
            _check_depth(num_layers, depth)
        student = make_student(teacher, num_layers, keep, method=cfg.selection,
                               data=_spread(batches, cfg.selection_batches) if selection_data is None else selection_data,
                               blocks=blocks, progress=progress)
        choice = getattr(student, "qruntime_layer_choice", None)
    selection_seconds = time.perf_counter() - start
    _check_vocab(teacher, student)
    s_blocks = find_blocks(student, None if blocks is None else t_blocks.path)
    layer_map = _layer_map(depth, student, len(s_blocks))
    device = _device(student)
    if _device(teacher) != device:
        raise ValueError(f"teacher on {_device(teacher)}, student on {device}: put both on one device")
    amp = autocast_dtype(cfg.autocast, device)
    torch.manual_seed(cfg.seed)

    # The loss terms that apply, from one teacher forward
    with torch.no_grad():
        probe = logits_of(model_forward(teacher, model_inputs(batches[0], device)))
    weights = _resolve_weights(cfg, probe is not None, _is_causal(student), layer_map is not None)
    cached = teacher_topk(teacher, batches, cfg.top_k, progress) if cfg.cache_teacher else None
    mask_params = _check_masks(student, masks)

    saved_flags = {p: p.requires_grad for p in student.parameters()}
    frozen = {id(p) for p in _frozen_embeddings(student)} if cfg.trainable == "no-embeddings" else set()
    params = [p for p in student.parameters() if id(p) not in frozen and p.is_floating_point()]
    trainable = {id(p) for p in params}
    for p in student.parameters():
        p.requires_grad_(id(p) in trainable)
    attn_impl = {}
    if weights.attention:
        for name, m in (("teacher", teacher), ("student", student)):
            impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
            if impl != "eager":
                if not hasattr(m, "set_attn_implementation"):
                    raise ValueError(f"alpha_attention: the {name} cannot switch to eager attention to return attention probabilities")
                attn_impl[name] = (m, impl)
                m.set_attn_implementation("eager")

    report = DistillReport(
        teacher_layers=depth, student_layers=len(s_blocks), kept_layers=layer_map,
        selection=choice.to_dict() if choice is not None else None,
        loss_weights=asdict(weights), selection_seconds=selection_seconds,
        autocast=str(amp).replace("torch.", "") if amp is not None else "off",
        trainable_parameters=sum(p.numel() for p in params), config=asdict(cfg),
    )
    if eval_batches:
        report.before = evaluate_student(teacher, student, eval_batches, teacher_metrics=True)
        if "teacher_perplexity" in report.before:
            report.teacher = {"perplexity": report.before.pop("teacher_perplexity")}
        report.history.append({**report.before, "step": 0, "train_tokens": 0, "seconds": 0.0})

    modes = _modes(teacher) + _modes(student)
    teacher.eval()
    _train_mode(student, cfg.dropout)
    # fused: one kernel per step instead of about ten passes over every parameter (CPU and CUDA)
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    order = torch.Generator().manual_seed(cfg.seed)
    queue: list[int] = []
    seen = 0
    t_train = time.perf_counter()
    try:
        bar = tqdm(range(cfg.steps), desc="distill", unit="step", disable=not progress)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step, time.perf_counter() - t_train)
            opt.zero_grad(set_to_none=True)
            step_loss = step_tokens = 0.0
            for _ in range(cfg.grad_accum):
                if not queue:
                    queue = (torch.randperm(len(batches), generator=order).tolist() if cfg.shuffle
                             else list(range(len(batches))))
                idx = queue.pop(0)
                seen += 1
                inputs = model_inputs(batches[idx], device)
                mask = _token_mask(inputs)
                loss, _ = _step_loss(teacher, student, t_blocks, s_blocks, inputs, mask, weights, cfg, layer_map,
                                     cached[idx] if cached is not None else None, amp, device)
                (loss / cfg.grad_accum).backward()
                step_loss += loss.item() / cfg.grad_accum
                step_tokens += mask.sum().item()
            for p, m in mask_params.values():
                if p.grad is not None:
                    p.grad.mul_(m)
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            with torch.no_grad():
                for p, m in mask_params.values():
                    p.mul_(m)
            report.steps = step + 1
            report.tokens += int(step_tokens)
            report.losses.append((step + 1, step_loss))
            elapsed = time.perf_counter() - t_train
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{report.tokens / max(elapsed, 1e-9):.0f}")
            if eval_batches and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                report.history.append({**evaluate_student(teacher, student, eval_batches), "step": step + 1,
                                       "train_tokens": report.tokens, "seconds": elapsed})
                _train_mode(student, cfg.dropout)
            if cfg.max_seconds is not None and elapsed >= cfg.max_seconds and step + 1 < cfg.steps:
                report.stopped_early = f"max_seconds={cfg.max_seconds:g} reached after {step + 1} of {cfg.steps} steps"
                break
        bar.close()
        report.seconds = time.perf_counter() - t_train
        report.epochs = seen / len(batches)
    finally:
        for p, flag in saved_flags.items():
            p.requires_grad_(flag)
        _restore(modes)
        for m, impl in attn_impl.values():
            if impl is not None:
                m.set_attn_implementation(impl)
    if eval_batches:
        report.after = evaluate_student(teacher, student, eval_batches)
        if not report.history or report.history[-1]["step"] != report.steps:
            report.history.append({**report.after, "step": report.steps, "train_tokens": report.tokens,
                                   "seconds": report.seconds})
    return student, report


def _modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Every module's ``training`` flag, for :func:`_restore` (``train(flag)`` would make them all alike)."""
    return [(m, m.training) for m in model.modules()]


def _restore(modes: list[tuple[nn.Module, bool]]) -> None:
    for module, flag in modes:
        module.training = flag


def _train_mode(student: nn.Module, dropout: bool) -> None:
    """``train()`` with dropout, else ``eval()`` (see DistillConfig.dropout), except that the modules
    with gradient checkpointing on (transformers' layers after ``gradient_checkpointing_enable()``) keep
    their own ``training`` flag set, without their children: they check it to checkpoint, and their
    dropout stays off."""
    student.train(dropout)
    if not dropout:
        for module in student.modules():
            if getattr(module, "gradient_checkpointing", False) is True:
                module.training = True


def _warn_if_sorted(batches: list) -> None:
    """Batches sorted by length (``sentence_batches``' default), trained in that order, go from the
    shortest sentences to the longest; under a time budget the long ones may never come."""
    lengths = []
    for b in batches:
        ids = b.get("input_ids") if isinstance(b, Mapping) else b
        if not isinstance(ids, torch.Tensor):
            return
        lengths.append(ids.shape[-1])
    if len(lengths) >= 3 and lengths[0] < lengths[-1] and all(x <= y for x, y in zip(lengths, lengths[1:])):
        warnings.warn(f"data: the {len(lengths)} batches grow from {lengths[0]} to {lengths[-1]} tokens (sorted by "
                      "length?) and shuffle=False trains them in that order; pass DistillConfig(shuffle=True)",
                      stacklevel=3)


def _spread(batches: list, k: int) -> list:
    """``k`` of ``batches``, the middle one of each of ``k`` equal stretches (all of them when k >= len)."""
    n = len(batches)
    return list(batches) if k >= n else [batches[(2 * i + 1) * n // (2 * k)] for i in range(k)]


def _step_loss(teacher, student, t_blocks, s_blocks, inputs, mask, w: _Weights, cfg: DistillConfig, layer_map, cached,
               amp, device) -> tuple[torch.Tensor, dict]:
    want_blocks = bool(w.hidden or w.cosine)
    parts: dict[str, torch.Tensor] = {}
    with autocast(device, amp):
        t_out = None
        t_cap = {"out": []}
        if cached is None:
            with torch.no_grad(), _capture(t_blocks) if want_blocks else contextlib.nullcontext(t_cap) as t_cap:
                t_out = model_forward(teacher, inputs, attentions=bool(w.attention))
        with _capture(s_blocks) if want_blocks else contextlib.nullcontext({"out": []}) as s_cap:
            s_out = model_forward(student, inputs, attentions=bool(w.attention))
    s_logits = logits_of(s_out)
    if w.kd:
        teacher_side = tuple(t.to(device) for t in cached) if cached is not None else logits_of(t_out)
        parts["kd"] = kd_loss(s_logits, teacher_side, cfg.temperature, mask, cfg.top_k if cached is None else None)
    if w.ce:
        target = inputs["input_ids"][:, 1:]
        m = mask[:, 1:] * mask[:, :-1]
        ce = F.cross_entropy(s_logits[:, :-1].float().flatten(0, 1), target.flatten(), reduction="none")
        parts["ce"] = _masked_mean(ce.view_as(m), m)
    if w.hidden:
        pairs = [(s_cap["out"][j], t_cap["out"][i]) for j, i in enumerate(layer_map)]
        parts["hidden"] = torch.stack([_hidden_mse(s, t, mask) for s, t in pairs]).mean()
    if w.cosine:
        # encoders: the last hidden states (the embeddings); else the last block's output
        s_last = getattr(s_out, "last_hidden_state", None)
        t_last = getattr(t_out, "last_hidden_state", None)
        if s_last is None or t_last is None:
            s_last, t_last = s_cap["out"][-1], t_cap["out"][-1]
        parts["cosine"] = _cosine_distance(s_last, t_last, mask)
    if w.attention:
        s_att, t_att = s_out.attentions, t_out.attentions
        if not s_att or not t_att:
            raise ValueError("alpha_attention: the models returned no attention probabilities")
        parts["attention"] = torch.stack([_attention_kl(s_att[j], t_att[i], mask) for j, i in enumerate(layer_map)]).mean()
    total = sum(getattr(w, k) * v for k, v in parts.items())
    return total, {k: v.item() for k, v in parts.items()}

