"""Depth distillation of a causal LM: block-selection methods compared without training, then the
chosen student distilled within a time budget, all scored by perplexity on the evaluation split.

    python bench/distill_causal_lm.py --model smollm2-135m --layers 20 --minutes 30 \
        --json bench/results/smollm2-135m_cpu_distill.json

Text: selection on --selection-windows windows of the calibration split; training on consecutive
windows of the training split; monitoring on windows of the calibration split after those; the
reported perplexities on the first --eval-tokens tokens of the evaluation split (as bench/eval_causal_lm.py).
The --minutes budget covers block selection and training together.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--layers", type=int, default=20)
    p.add_argument("--compare", nargs="*", default=["greedy", "single", "influence", "angular", "uniform", "middle", "first"],
                   help="selection methods scored without training")
    p.add_argument("--train-method", default="single", help="selection of the student that is trained ('none': no training)")
    p.add_argument("--minutes", type=float, default=30.0, help="budget for selection + training")
    p.add_argument("--steps", type=int, default=400, help="upper bound; the time budget usually ends training first")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--alpha-hidden", type=float, default=0.0)
    p.add_argument("--alpha-ce", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--trainable", default="no-embeddings")
    p.add_argument("--autocast", default="auto")
    p.add_argument("--selection-windows", type=int, default=2)
    p.add_argument("--selection-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch

    from qruntime.calibration.stats import text_batches
    from qruntime.eval.data import calibration_batches
    from qruntime.distill.config import DistillConfig
    from qruntime.eval.data import split_text
    from qruntime.distill.selection import choose_layers
    from qruntime.distill.student import make_student
    from qruntime.distill.trainer import distill
    from qruntime.eval.evaluate import evaluate_causal_lm, tokenize_text
    from qruntime.eval.models import load_causal_lm

    teacher, tok = load_causal_lm(args.model)
    depth = teacher.config.num_hidden_layers
    eval_ids = tokenize_text(tok, split_text("eval"), args.eval_tokens)
    selection = calibration_batches(tok, num_samples=args.selection_windows, seq_len=args.selection_len)
    # monitoring windows: calibration text after the selection windows (disjoint from training and eval)
    monitor = calibration_batches(tok, num_samples=args.selection_windows + 4, seq_len=args.seq_len)[args.selection_windows:]
    train_text = split_text("train")
    n_train = len(tok(train_text, add_special_tokens=False)["input_ids"]) // (args.seq_len * args.batch)
    train = [w.reshape(args.batch, args.seq_len) for w in
             torch.stack(text_batches(tok, train_text, n_train * args.batch, args.seq_len, source="train split"))
             .reshape(n_train, args.batch, args.seq_len)]

    t0 = time.perf_counter()
    ref = evaluate_causal_lm(teacher, eval_ids)
    print(f"teacher ({depth} blocks): perplexity {ref.perplexity:.3f} on {ref.protocol} ({time.perf_counter() - t0:.0f} s)")
    rows = []
    choices = {}
    for method in args.compare:
        choice = choose_layers(teacher, args.layers, method, selection)
        choices[method] = choice
        student = make_student(teacher, keep=choice.keep)
        r = evaluate_causal_lm(student, eval_ids)
        rows.append({"method": method, "keep": choice.keep, "selection_divergence": choice.divergence,
                     "selection_seconds": choice.seconds, "perplexity": r.perplexity,
                     "perplexity_ratio": r.perplexity / ref.perplexity, "trained": False})
        print(f"{method:<10} no training: ppl {r.perplexity:12.3f} (x{r.perplexity / ref.perplexity:9.3f}), "
              f"selection KL {choice.divergence:.4f}, kept {choice.keep} ({choice.seconds:.0f} s)", flush=True)
        del student

    trained = None
    if args.train_method != "none":
        budget = args.minutes * 60
        t_sel = time.perf_counter()
        choice = choose_layers(teacher, args.layers, args.train_method, selection)  # timed inside the budget
        student = make_student(teacher, keep=choice.keep)
        sel_s = time.perf_counter() - t_sel
        cfg = DistillConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, alpha_hidden=args.alpha_hidden,
                            alpha_ce=args.alpha_ce, temperature=args.temperature, trainable=args.trainable,
                            autocast=args.autocast, eval_every=args.eval_every, max_seconds=budget - sel_s)
        student, report = distill(teacher, student, train, cfg, eval_data=monitor)
        print(report)
        r = evaluate_causal_lm(student, eval_ids)
        trained = {"method": args.train_method, "keep": choice.keep, "selection_seconds": sel_s,
                   "perplexity": r.perplexity, "perplexity_ratio": r.perplexity / ref.perplexity,
                   "trained": True, "train_seconds": report.seconds, "minutes_total": (sel_s + report.seconds) / 60,
                   "report": report.to_dict()}
        rows.append(trained)

    print(f"\nmodel {args.model}: {depth} -> {args.layers} blocks; teacher perplexity {ref.perplexity:.3f}; {ref.protocol}")
    print(f"{'selection':<10} {'trained':>8} {'perplexity':>12} {'ratio':>10} {'minutes':>8}  kept blocks")
    for r in rows:
        minutes = r.get("minutes_total", r["selection_seconds"] / 60)
        print(f"{r['method']:<10} {'yes' if r['trained'] else 'no':>8} {r['perplexity']:>12.3f} {r['perplexity_ratio']:>10.3f} "
              f"{minutes:>8.1f}  {r['keep']}")
    write_json(args.json, {"environment": environment(), "args": vars(args), "teacher_perplexity": ref.perplexity,
                           "protocol": ref.protocol, "train_windows": len(train) * args.batch, "results": rows})


if __name__ == "__main__":
    main()
