"""Depth distillation of a sentence-embedding encoder (MiniLM-L6 -> 3 blocks): selection methods without
training, then the chosen student distilled within a time budget; scored by sentence-embedding cosine to
the teacher and linear-probe accuracy on the 200 labelled movie-review sentences (as bench/eval_encoder.py: the
teacher's probe on the student's embeddings, and a probe refit on the student's own), and by the cosine on
sentences of the evaluation split (--eval-batches x --batch, in text order); then by the further tasks of
qruntime.eval.evaluate.evaluate_encoder_tasks (sentiment probe on 4,000 movie-review sentences, topic probe on
200 Usenet posts, Lee document similarity).

    python bench/distill_encoder.py --model minilm-l6 --layers 3 --minutes 10 \
        --json bench/results/minilm-l6_cpu_distill_sorted.json

Training text: sentences of the Wikipedia training split (and Lee background news), and with --reviews N
those of N full movie reviews (other texts than the scored sentences), --batch per batch, batched by length
(qruntime.calibration.stats.sentence_batches; --no-sort for text order); the --minutes budget covers block
selection and training together.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TASK_HEADER, cv_probe_difference, environment, task_columns, teacher_tasks, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--compare", nargs="*", default=["greedy", "single", "influence", "angular", "uniform", "middle", "first"])
    p.add_argument("--train-method", default="single")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=6000, help="upper bound; the time budget usually ends training first")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--alpha-hidden", type=float, default=1.0)
    p.add_argument("--alpha-cosine", type=float, default=1.0)
    p.add_argument("--alpha-attention", type=float, default=0.0)
    p.add_argument("--autocast", default="auto")
    p.add_argument("--trainable", default="no-embeddings", choices=["no-embeddings", "all"],
                   help="no-embeddings: the word-embedding matrix stays the teacher's (the library's default)")
    p.add_argument("--dropout", action="store_true", help="train with the student's dropout (default: off)")
    p.add_argument("--no-sort", action="store_true", help="batch sentences in text order (about half the tokens are padding)")
    p.add_argument("--reviews", type=int, default=0,
                   help="also train on the sentences of this many full movie reviews (qruntime.eval.data."
                        "movie_review_documents, half positive, half negative; their labels are not used)")
    p.add_argument("--selection-batches", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=16, help="batches of evaluation-split sentences scored by cosine")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from qruntime.calibration.stats import sentence_batches
    from qruntime.distill.config import DistillConfig
    from qruntime.eval.data import movie_review_documents, movie_reviews, split_text
    from qruntime.distill.selection import choose_layers
    from qruntime.distill.student import make_student
    from qruntime.distill.trainer import distill, evaluate_student
    from qruntime.eval.evaluate import evaluate_encoder, evaluate_encoder_tasks
    from qruntime.eval.models import load_encoder

    teacher, tok = load_encoder(args.model)
    depth = teacher.config.num_hidden_layers
    reviews = movie_reviews()
    sentences, labels = [s for s, _ in reviews], [y for _, y in reviews]
    text = split_text("train")
    if args.reviews:
        by_label = [[r for r, y in movie_review_documents() if y == label] for label in (1, 0)]
        # the first reviews of each label, in file order (half positive, half negative)
        picked = by_label[0][: (args.reviews + 1) // 2] + by_label[1][: args.reviews // 2]
        text += "\n" + "\n".join(picked)
    train = sentence_batches(tok, text, args.batch, args.max_length, sort_by_length=not args.no_sort)
    # selection and the held-out monitor: sentences in text order, as a user's batches would come
    calib = sentence_batches(tok, split_text("calibration"), args.batch, args.max_length,
                             sort_by_length=False, limit=args.selection_batches + 4)
    selection, monitor = calib[: args.selection_batches], calib[args.selection_batches :]
    # the evaluation split (never trained or selected on): sentence-embedding cosine to the teacher
    eval_split = sentence_batches(tok, split_text("eval"), args.batch, args.max_length, sort_by_length=False,
                                  limit=args.eval_batches)
    ref = evaluate_encoder(teacher, teacher, tok, sentences, labels)
    ref_tasks = evaluate_encoder_tasks(teacher, teacher, tok)
    print(f"teacher ({depth} blocks): probe accuracy {ref.probe_accuracy_reference:.3f} "
          f"(cross-validated {ref.probe_cv_reference:.3f}); {ref.protocol}; {teacher_tasks(ref_tasks.to_dict())}")

    rows = []
    for method in args.compare:
        choice = choose_layers(teacher, args.layers, method, selection, progress=False)
        candidate = make_student(teacher, keep=choice.keep)
        r = evaluate_encoder(candidate, teacher, tok, sentences, labels)
        split_cos = evaluate_student(teacher, candidate, eval_split)["cosine"]
        rows.append({"method": method, "keep": choice.keep, "selection_divergence": choice.divergence,
                     "selection_seconds": choice.seconds, "trained": False, "eval": r.to_dict(),
                     "eval_split_cosine": split_cos, "tasks": evaluate_encoder_tasks(candidate, teacher, tok).to_dict()})
        print(f"{method:<10} no training: cosine {r.cosine_mean:.4f} (eval split {split_cos:.4f}), "
              f"probe {r.probe_accuracy_model:.3f} (refit {r.probe_accuracy_model_refit:.3f}), kept {choice.keep}", flush=True)

    if args.train_method != "none":
        budget = args.minutes * 60
        t_sel = time.perf_counter()
        choice = choose_layers(teacher, args.layers, args.train_method, selection, progress=False)
        student = make_student(teacher, keep=choice.keep)
        sel_s = time.perf_counter() - t_sel
        cfg = DistillConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, alpha_kd=0.0,
                            alpha_hidden=args.alpha_hidden, alpha_cosine=args.alpha_cosine,
                            alpha_attention=args.alpha_attention, autocast=args.autocast, trainable=args.trainable,
                            dropout=args.dropout,
                            shuffle=True, eval_every=max(1, args.steps // 10), max_seconds=budget - sel_s)
        student, report = distill(teacher, student, train, cfg, eval_data=monitor)
        print(report)
        r = evaluate_encoder(student, teacher, tok, sentences, labels)
        rows.append({"method": args.train_method, "keep": choice.keep, "selection_seconds": sel_s, "trained": True,
                     "eval_split_cosine": evaluate_student(teacher, student, eval_split)["cosine"],
                     "train_seconds": report.seconds, "minutes_total": (sel_s + report.seconds) / 60,
                     "eval": r.to_dict(), "tasks": evaluate_encoder_tasks(student, teacher, tok).to_dict(),
                     "report": report.to_dict()})

    print(f"\nmodel {args.model}: {depth} -> {args.layers} blocks; teacher probe accuracy {ref.probe_accuracy_reference:.3f} "
          f"(cross-validated {ref.probe_cv_reference:.3f}); {ref.protocol}")
    print(f"\nsentence-embedding cosine on the movie reviews and on {sum(len(b['input_ids']) for b in eval_split)} "
          "sentences of the evaluation split")
    print(f"{'selection':<10} {'trained':>8} {'cosine mean':>12} {'cosine min':>11} {'eval split':>11} {'probe acc':>10} "
          f"{'vs teacher':>11} {'refit probe':>12} {'cv probe':>9} {'cv vs teacher':>14} {'cv refit':>9} {'minutes':>8}  kept")
    for r in rows:
        e = r["eval"]
        minutes = r.get("minutes_total", r["selection_seconds"] / 60)
        cv_diff = cv_probe_difference(e)
        print(f"{r['method']:<10} {'yes' if r['trained'] else 'no':>8} {e['cosine_mean']:>12.4f} {e['cosine_min']:>11.4f} "
              f"{r['eval_split_cosine']:>11.4f} "
              f"{e['probe_accuracy_model']:>10.3f} {100 * (e['probe_accuracy_model'] - e['probe_accuracy_reference']):>+10.1f}p "
              f"{e['probe_accuracy_model_refit']:>12.3f} {e['probe_cv_model']:>9.3f} {cv_diff:>14} "
              f"{e['probe_cv_model_refit']:>9.3f} {minutes:>8.1f}  {r['keep']}")
    print(f"\nfurther tasks; the teacher: {teacher_tasks(ref_tasks.to_dict())}")
    print(f"{'selection':<10} {'trained':>8} {TASK_HEADER}  kept")
    for r in rows:
        print(f"{r['method']:<10} {'yes' if r['trained'] else 'no':>8} {task_columns(r['tasks'])}  {r['keep']}")
    real = sum(int(b["attention_mask"].sum()) for b in train)
    padded = sum(b["attention_mask"].numel() for b in train)
    print(f"training text: {len(train)} batches, {real} tokens, {100 * (1 - real / padded):.1f}% of the padded tokens are padding")
    write_json(args.json, {"environment": environment(), "args": vars(args), "train_batches": len(train),
                           "train_tokens": real, "train_padded_tokens": padded,
                           "teacher_probe_accuracy": ref.probe_accuracy_reference,
                           "teacher_probe_accuracy_cv": ref.probe_cv_reference, "teacher_tasks": ref_tasks.to_dict(),
                           "results": rows})


if __name__ == "__main__":
    main()
