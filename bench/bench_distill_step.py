"""Distillation trainer speed on the CPU, side by side in one run: the chunked KD loss against the plain
formula, fused AdamW against the default, and a whole recovery step of SmolLM2-135M (2:4 masks) with
both against neither.

    python bench/bench_distill_step.py --json bench/results/smollm2-135m_cpu_distill_step.json

Every comparison alternates its two sides round by round and reports medians and their ratio (the
machines are noisy: read the ratios). The "plain" sides are what the trainer did before: log_softmax of
both logits in float32 over the whole batch, then sum p (log p - log q), autograd for the gradient; and
torch's default AdamW (foreach).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402


def plain_kd_loss(student_logits, teacher, temperature=1.0, mask=None, top_k=None):
    """The formula the trainer used before the chunked loss (full-vocabulary case only)."""
    import torch.nn.functional as F

    from qruntime.distill.losses import _kl_rows

    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher.float() / temperature, dim=-1)
    per = _kl_rows(t, s)
    return temperature**2 * (per.mean() if mask is None else (per * mask).sum() / mask.sum().clamp(min=1))


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per comparison")
    p.add_argument("--steps", type=int, default=3, help="trainer steps per round of the whole-step comparison")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from qruntime.distill.config import DistillConfig
    from qruntime.distill.losses import kd_loss
    from qruntime.eval.models import load_causal_lm

    dmod = sys.modules["qruntime.distill.trainer"]  # the module (qruntime.distill is also the function), for the patches
    model, _ = load_causal_lm(args.model)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = args.batch * args.seq_len
    results = {}

    # 1. the KD loss, forward + backward, bf16 logits as under autocast
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(rows, vocab, generator=g)).bfloat16().requires_grad_()
    t = (3 * torch.randn(rows, vocab, generator=g)).bfloat16()

    def run(loss_fn):
        def go():
            s.grad = None
            loss_fn(s, t).backward()
        return go

    sides = {"chunked": [], "plain": []}
    for _ in range(args.rounds):
        sides["chunked"] += timed(run(kd_loss), 1)
        sides["plain"] += timed(run(plain_kd_loss), 1)
    print("KD loss timed", flush=True)
    results["kd_loss"] = _row(f"KD loss fwd+bwd [{rows}, {vocab}] bf16", sides, "plain", "chunked")
    del s, t

    # 2. AdamW on the trainable parameters of the model (everything but the vocabulary matrix)
    frozen = {id(p) for p in dmod._frozen_embeddings(model)}
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if id(p) not in frozen]
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    opts = {"fused": torch.optim.AdamW(params, lr=1e-4, fused=True), "default": torch.optim.AdamW(params, lr=1e-4)}
    sides = {"fused": [], "default": []}
    for _ in range(args.rounds):
        for name in sides:
            sides[name] += timed(opts[name].step, 1)
    n = sum(q.numel() for q in params)
    print("AdamW timed", flush=True)
    results["adamw"] = _row(f"AdamW step, {n / 1e6:.1f}M parameters", sides, "default", "fused")
    del params, opts

    # 3. whole recovery steps: a 2:4 (magnitude) copy of the model distilled from it, batch x seq_len tokens
    student = copy.deepcopy(model)
    masks = {}
    with torch.no_grad():
        for name, m in student.named_modules():
            if isinstance(m, torch.nn.Linear) and m is not student.get_output_embeddings():
                w = m.weight.view(m.weight.shape[0], -1, 4)
                keep = torch.zeros_like(w).scatter_(-1, w.abs().topk(2, dim=-1).indices, 1).view_as(m.weight)
                m.weight.mul_(keep)
                masks[f"{name}.weight"] = keep
    batches = [torch.randint(0, vocab, (args.batch, args.seq_len), generator=g) for _ in range(args.steps + 1)]
    cfg = DistillConfig(steps=args.steps + 1, lr=2e-4, warmup_steps=1, autocast="auto")

    @contextlib.contextmanager
    def before():
        adamw, loss = torch.optim.AdamW, dmod.kd_loss

        class Unfused(adamw):
            def __init__(self, *a, fused=None, **k):
                super().__init__(*a, **k)

        torch.optim.AdamW, dmod.kd_loss = Unfused, plain_kd_loss
        try:
            yield
        finally:
            torch.optim.AdamW, dmod.kd_loss = adamw, loss

    def step_seconds(ctx) -> float:
        # the first step (allocations, autocast cache) is left out: the report's losses carry no times,
        # so time steps + 1 and 1 step and take the difference
        with ctx():
            t0 = time.perf_counter()
            dmod.distill(model, copy.deepcopy(student), batches, cfg, masks=masks, progress=False)
            long = time.perf_counter() - t0
            t0 = time.perf_counter()
            dmod.distill(model, copy.deepcopy(student), batches[:1], replace(cfg, steps=1),
                         masks=masks, progress=False)
            short = time.perf_counter() - t0
        return (long - short) / args.steps

    sides = {"now": [], "before": []}
    for _ in range(max(2, args.rounds // 2)):
        sides["now"].append(step_seconds(contextlib.nullcontext))
        sides["before"].append(step_seconds(before))
    results["step"] = _row(f"recovery step, {args.batch} x {args.seq_len} tokens, bf16 autocast", sides, "before", "now")

    print(f"\n{'what':<58} {'before (s)':>11} {'now (s)':>9} {'speed-up':>9}")
    for r in results.values():
        print(f"{r['what']:<58} {r['before_s']:>11.3f} {r['now_s']:>9.3f} {r['speedup']:>8.2f}x")
    write_json(args.json, {"environment": environment(), "args": vars(args), "results": results})


def _row(what: str, sides: dict, before: str, now: str) -> dict:
    b, n = statistics.median(sides[before]), statistics.median(sides[now])
    return {"what": what, "before": before, "now": now, "before_s": b, "now_s": n, "speedup": b / n,
            "samples": sides}


if __name__ == "__main__":
    main()
