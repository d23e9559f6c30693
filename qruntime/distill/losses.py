"""The distillation losses: KL of the logits (chunked over the vocabulary, optionally top-k), hidden-state
MSE, cosine of the last hidden states, attention KL, and the weights of each (:class:`DistillConfig`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DistillConfig

__all__ = ["kd_loss"]


def _token_mask(inputs: dict) -> torch.Tensor:
    """float [B, T]: 1 for real tokens, 0 for padding."""
    mask = inputs.get("attention_mask")
    if mask is not None:
        return mask.to(torch.float32)
    ref = inputs["input_ids"] if "input_ids" in inputs else inputs["inputs_embeds"][..., 0]
    return torch.ones(ref.shape[:2], dtype=torch.float32, device=ref.device)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def _kl_rows(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim, from log-probabilities: sum p (log p - log q)."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _cosine_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _masked_mean(1 - F.cosine_similarity(a.float(), b.float(), dim=-1), mask)


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

