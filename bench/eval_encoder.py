"""Sentence-embedding fidelity of compressed encoders: cosine to the original's embeddings and the
accuracy of a linear probe (fit on the original's embeddings) on the 200 labelled movie-review sentences;
then a sentiment probe on 4,000 movie-review sentences, a topic probe on 200 Usenet posts and the
correlation of embedding similarity with human ratings of Lee news documents
(qruntime.eval.evaluate.evaluate_encoder_tasks).

    python bench/eval_encoder.py --model minilm-l6 --preset w8a16 w4a16-g32 --json bench/results/minilm_cpu.json
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import TASK_HEADER, cv_probe_difference, environment, task_columns, teacher_tasks, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-l6")
    p.add_argument("--preset", nargs="+", default=["w8a16", "w8a16-gptq", "w4a16-g32-rtn", "w4a16-g32"])
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from qruntime import compress
    from qruntime.eval.data import calibration_batches
    from qruntime.recipes.presets import resolve_config
    from qruntime.eval.data import movie_reviews
    from qruntime.eval.evaluate import evaluate_encoder, evaluate_encoder_tasks
    from qruntime.eval.models import load_encoder

    model, tok = load_encoder(args.model)
    reviews = movie_reviews()
    sentences, labels = [s for s, _ in reviews], [y for _, y in reviews]
    rows = []
    for preset in args.preset:
        calib = None
        if resolve_config(preset).needs_calibration:  # Wikipedia calibration split, 16 x 256 tokens
            calib = calibration_batches(tok, num_samples=16, seq_len=256)
        qmodel, report = compress(model, preset, calib, inplace=False)
        result = evaluate_encoder(qmodel, model, tok, sentences, labels)
        rows.append({"preset": report.config, "report": report.to_dict(), "eval": result.to_dict(),
                     "tasks": evaluate_encoder_tasks(qmodel, model, tok).to_dict()})

    print(f"\nmodel {args.model}; protocol: {rows[0]['eval']['protocol']}")
    print(f"{'recipe':<20} {'cos mean':>9} {'cos min':>9} {'probe acc (orig)':>17} {'probe acc (q)':>14} "
          f"{'cv (orig)':>10} {'cv (q)':>7} {'cv diff':>13} {'x smaller':>10}")
    for r in rows:
        e, rep = r["eval"], r["report"]
        cv_diff = cv_probe_difference(e)
        print(f"{r['preset']:<20} {e['cosine_mean']:>9.5f} {e['cosine_min']:>9.5f} "
              f"{e['probe_accuracy_reference']:>17.3f} {e['probe_accuracy_model']:>14.3f} "
              f"{e['probe_cv_reference']:>10.3f} {e['probe_cv_model']:>7.3f} {cv_diff:>13} {rep['weight_compression']:>10.2f}")
    print(f"\nfurther tasks; the original: {teacher_tasks(rows[0]['tasks'])}")
    print(f"{'recipe':<20} {TASK_HEADER}")
    for r in rows:
        print(f"{r['preset']:<20} {task_columns(r['tasks'])}")
    write_json(args.json, {"environment": environment(), "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
