"""Depth distillation: a student with fewer blocks, copied from the teacher and trained to match it.

    student, report = qruntime.distill(teacher, 20, train_batches, DistillConfig(steps=300),
                                       eval_data=held_out_batches)
    print(report)

Three steps:

1. **Where the blocks are** (:func:`qruntime.plumbing.model.find_blocks`): the model's list of repeated blocks
   (Llama-family ``model.layers``, GPT-2 ``transformer.h``, BERT ``encoder.layer``, ...), found as the one
   ``nn.ModuleList`` of identical modules whose length is ``config.num_hidden_layers``.
2. **Which blocks to keep** (:func:`qruntime.distill.selection.choose_layers`): measured on data (``greedy``, ``single``,
   ``influence``, ``angular``) or naive (``uniform``, ``first``, ``middle``), see
   :data:`qruntime.distill.config.SELECTION_METHODS`. :func:`qruntime.distill.student.make_student` copies the kept blocks into a new
   model, renumbers their ``layer_idx`` (KV caches) and updates the config, so ``generate`` and
   ``save_pretrained`` work.
3. **Training** (:func:`distill`, this module; the losses in :mod:`qruntime.distill.losses`): the
   student learns the teacher's outputs: ``T^2 * KL(teacher ||
   student)`` of the logits, optionally hidden-state MSE on mapped blocks (student block j <-> the
   teacher block it was copied from), cosine of the last hidden states (encoders), attention KL and
   next-token cross-entropy. AdamW, linear warm-up then cosine decay, gradient accumulation, bf16
   autocast where the device runs it natively, fixed masks (2:4 recovery), held-out evaluation.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import DistillConfig
from .depth import _capture, _check_depth, _device, _is_causal
from .losses import (_Weights, _attention_kl, _cosine_distance, _hidden_mse, _kl_rows, _masked_mean, _resolve_weights,
                     _token_mask, kd_loss)
from .student import make_student
from qruntime.plumbing.model import Blocks, autocast, autocast_dtype, find_blocks, logits_of, model_forward, model_inputs

__all__ = [
    "distill",
    "DistillReport",
    "evaluate_student",
    "teacher_topk",
]


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


@dataclass
class _Run:
    """One :func:`distill` call: the models, data and settings every step shares."""

    teacher: nn.Module
    student: nn.Module
    cfg: DistillConfig
    batches: list
    eval_batches: list
    t_blocks: Blocks
    s_blocks: Blocks
    layer_map: list[int] | None
    device: torch.device
    amp: torch.dtype | None
    weights: _Weights | None = None
    cached: list | None = None  # the teacher's top-k logits per batch (cache_teacher)
    mask_params: dict = field(default_factory=dict)  # name -> (parameter, 0/1 mask)
    params: list = field(default_factory=list)  # the trained parameters
    report: DistillReport | None = None
    progress: bool = True
    seen: int = 0  # batches drawn


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
            by length, as :func:`qruntime.calibration.stats.sentence_batches` gives it, is measured on short and
            long sentences alike, not only on its first, shortest, batches).
        masks: parameter name -> 0/1 tensor of the same shape; masked entries stay exactly zero
            (gradients and weights are masked every step), e.g. 2:4 sparsity masks.
        blocks: the path of the block list when it cannot be found automatically.
        progress: progress bars (loss and tokens/s).
    """
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected a torch.nn.Module, got {type(teacher).__name__}")
    cfg = _config(student_or_num_layers, config)
    batches = list(data)
    if not batches:
        raise ValueError("data yielded no batches")
    if not cfg.shuffle:
        _warn_if_sorted(batches)
    t_blocks = find_blocks(teacher, blocks)
    start = time.perf_counter()
    student, choice = _student(teacher, student_or_num_layers, cfg, len(t_blocks),
                               _spread(batches, cfg.selection_batches) if selection_data is None else selection_data,
                               blocks, progress)
    selection_seconds = time.perf_counter() - start
    run = _prepare(teacher, student, cfg, batches, list(eval_data) if eval_data is not None else [], t_blocks, blocks,
                   progress)
    run.mask_params = _check_masks(student, masks)
    with _trained_parameters(run), _eager_attention(run):
        run.report = DistillReport(
            teacher_layers=len(t_blocks), student_layers=len(run.s_blocks), kept_layers=run.layer_map,
            selection=choice.to_dict() if choice is not None else None,
            loss_weights=asdict(run.weights), selection_seconds=selection_seconds,
            autocast=str(run.amp).replace("torch.", "") if run.amp is not None else "off",
            trainable_parameters=sum(p.numel() for p in run.params), config=asdict(cfg),
        )
        _evaluate_before(run)
        _train(run)
    _evaluate_after(run)
    return student, run.report


def _config(arg, config: DistillConfig | None) -> DistillConfig:
    """The run's DistillConfig: ``config``, or the defaults with ``num_layers=arg`` for a block count."""
    is_count = isinstance(arg, int) and not isinstance(arg, bool)
    cfg = config if config is not None else DistillConfig(num_layers=arg) if is_count else DistillConfig()
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"config={cfg!r}: must be a DistillConfig")
    if is_count and cfg.num_layers not in (None, arg):
        raise ValueError(f"student_or_num_layers={arg} but config.num_layers={cfg.num_layers}: give one")
    return cfg


def _student(teacher: nn.Module, arg, cfg: DistillConfig, depth: int, selection: Iterable, blocks: str | None,
             progress: bool) -> tuple[nn.Module, object]:
    """The student given, or built by :func:`make_student` (with its block choice, or None)."""
    if isinstance(arg, nn.Module):
        return arg, None
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
    student = make_student(teacher, num_layers, keep, method=cfg.selection, data=selection, blocks=blocks,
                           progress=progress)
    return student, getattr(student, "qruntime_layer_choice", None)


def _prepare(teacher: nn.Module, student: nn.Module, cfg: DistillConfig, batches: list, eval_batches: list,
             t_blocks: Blocks, blocks: str | None, progress: bool) -> _Run:
    """Checks the pair, finds the student's blocks, and picks the loss terms from one teacher forward."""
    _check_vocab(teacher, student)
    s_blocks = find_blocks(student, None if blocks is None else t_blocks.path)
    device = _device(student)
    if _device(teacher) != device:
        raise ValueError(f"teacher on {_device(teacher)}, student on {device}: put both on one device")
    run = _Run(teacher, student, cfg, batches, eval_batches, t_blocks, s_blocks,
               _layer_map(len(t_blocks), student, len(s_blocks)), device, autocast_dtype(cfg.autocast, device),
               progress=progress)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        probe = logits_of(model_forward(teacher, model_inputs(batches[0], device)))
    run.weights = _resolve_weights(cfg, probe is not None, _is_causal(student), run.layer_map is not None)
    run.cached = teacher_topk(teacher, batches, cfg.top_k, run.progress) if cfg.cache_teacher else None
    return run


@contextlib.contextmanager
def _trained_parameters(run: _Run):
    """Sets ``run.params`` (every floating parameter of the student, less the embeddings with
    ``trainable="no-embeddings"``) trainable and the rest frozen; restores every flag on exit."""
    student = run.student
    saved = {p: p.requires_grad for p in student.parameters()}
    frozen = {id(p) for p in _frozen_embeddings(student)} if run.cfg.trainable == "no-embeddings" else set()
    run.params = [p for p in student.parameters() if id(p) not in frozen and p.is_floating_point()]
    trainable = {id(p) for p in run.params}
    try:
        for p in student.parameters():
            p.requires_grad_(id(p) in trainable)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


@contextlib.contextmanager
def _eager_attention(run: _Run):
    """With an attention loss, both models switched to eager attention (which returns the probabilities),
    and back on exit."""
    switched = []
    try:
        if run.weights.attention:
            for name, m in (("teacher", run.teacher), ("student", run.student)):
                impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
                if impl != "eager":
                    if not hasattr(m, "set_attn_implementation"):
                        raise ValueError(f"alpha_attention: the {name} cannot switch to eager attention to return "
                                         "attention probabilities")
                    switched.append((m, impl))
                    m.set_attn_implementation("eager")
        yield
    finally:
        for m, impl in switched:
            if impl is not None:
                m.set_attn_implementation(impl)


def _evaluate_before(run: _Run) -> None:
    report = run.report
    if not run.eval_batches:
        return
    report.before = evaluate_student(run.teacher, run.student, run.eval_batches, teacher_metrics=True)
    if "teacher_perplexity" in report.before:
        report.teacher = {"perplexity": report.before.pop("teacher_perplexity")}
    report.history.append({**report.before, "step": 0, "train_tokens": 0, "seconds": 0.0})


def _evaluate_after(run: _Run) -> None:
    report = run.report
    if not run.eval_batches:
        return
    report.after = evaluate_student(run.teacher, run.student, run.eval_batches)
    if not report.history or report.history[-1]["step"] != report.steps:
        report.history.append({**report.after, "step": report.steps, "train_tokens": report.tokens,
                               "seconds": report.seconds})


def _train(run: _Run) -> None:
    """The training loop: AdamW steps of ``grad_accum`` batches each, the masks kept, held-out evaluations
    every ``eval_every`` steps, until ``steps`` or ``max_seconds``. Every module's mode is restored."""
    cfg, report = run.cfg, run.report
    modes = _modes(run.teacher) + _modes(run.student)
    run.teacher.eval()
    _train_mode(run.student, cfg.dropout)
    # fused: one kernel per step instead of about ten passes over every parameter (CPU and CUDA)
    fused = bool(run.params) and all(p.device.type in ("cpu", "cuda") for p in run.params)
    opt = torch.optim.AdamW(run.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    batch_order = _batch_order(run)
    t_train = time.perf_counter()
    try:
        bar = tqdm(range(cfg.steps), desc="distill", unit="step", disable=not run.progress)
        for step in bar:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, step, time.perf_counter() - t_train)
            step_loss = _train_step(run, opt, batch_order)
            report.steps = step + 1
            report.losses.append((step + 1, step_loss))
            elapsed = time.perf_counter() - t_train
            bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{report.tokens / max(elapsed, 1e-9):.0f}")
            if run.eval_batches and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
                report.history.append({**evaluate_student(run.teacher, run.student, run.eval_batches),
                                       "step": step + 1, "train_tokens": report.tokens, "seconds": elapsed})
                _train_mode(run.student, cfg.dropout)
            if cfg.max_seconds is not None and elapsed >= cfg.max_seconds and step + 1 < cfg.steps:
                report.stopped_early = f"max_seconds={cfg.max_seconds:g} reached after {step + 1} of {cfg.steps} steps"
                break
        bar.close()
        report.seconds = time.perf_counter() - t_train
        report.epochs = run.seen / len(run.batches)
    finally:
        _restore(modes)


def _batch_order(run: _Run):
    """The batch indices in training order, endless: each epoch a permutation (``shuffle``, seeded by
    ``seed``), else in order."""
    order = torch.Generator().manual_seed(run.cfg.seed)
    n = len(run.batches)
    while True:
        yield from torch.randperm(n, generator=order).tolist() if run.cfg.shuffle else range(n)


def _train_step(run: _Run, opt: torch.optim.Optimizer, batch_order) -> float:
    """One optimizer step over ``grad_accum`` batches; returns its mean loss and counts its tokens."""
    cfg = run.cfg
    opt.zero_grad(set_to_none=True)
    step_loss = step_tokens = 0.0
    for _ in range(cfg.grad_accum):
        idx = next(batch_order)
        run.seen += 1
        inputs = model_inputs(run.batches[idx], run.device)
        mask = _token_mask(inputs)
        loss, _ = _step_loss(run, inputs, mask, run.cached[idx] if run.cached is not None else None)
        (loss / cfg.grad_accum).backward()
        step_loss += loss.item() / cfg.grad_accum
        step_tokens += mask.sum().item()
    for p, m in run.mask_params.values():
        if p.grad is not None:
            p.grad.mul_(m)
    if cfg.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm)
    opt.step()
    with torch.no_grad():
        for p, m in run.mask_params.values():
            p.mul_(m)
    run.report.tokens += int(step_tokens)
    return step_loss


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


def _step_loss(run: _Run, inputs: dict, mask: torch.Tensor, cached) -> tuple[torch.Tensor, dict]:
    """The weighted loss of one batch (and each term's value), the teacher's side from ``cached`` top-k
    logits when given, else from a teacher forward."""
    teacher, student, w, cfg, layer_map, device = run.teacher, run.student, run.weights, run.cfg, run.layer_map, run.device
    want_blocks = bool(w.hidden or w.cosine)
    parts: dict[str, torch.Tensor] = {}
    with autocast(device, run.amp):
        t_out = None
        t_cap = {"out": []}
        if cached is None:
            with torch.no_grad(), _capture(run.t_blocks) if want_blocks else contextlib.nullcontext(t_cap) as t_cap:
                t_out = model_forward(teacher, inputs, attentions=bool(w.attention))
        with _capture(run.s_blocks) if want_blocks else contextlib.nullcontext({"out": []}) as s_cap:
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

