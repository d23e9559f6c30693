"""Perplexity, next-token top-1 agreement and KL of compressed causal LMs against the original.

    python bench/eval_causal_lm.py --model smollm2-135m --preset w8a16 w8a16-gptq w4a16-g128 \
        --eval-tokens 16384 --json bench/results/smollm2_cpu.json

Text: the Wikipedia evaluation split of qruntime.eval.data (first --eval-tokens tokens); calibration for
calibrated recipes (GPTQ, SmoothQuant, ...): --calib-samples windows of the calibration split (disjoint
from the evaluation text).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--preset", nargs="+", default=["w8a16", "w8a16-gptq"])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="default: --window (non-overlapping)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--budget-samples", type=int, default=0,
                   help="recipes with an accuracy budget (-budget<x>, auto): measure it on this many windows of "
                        "the training split (held out from calibration and evaluation); 0: on the calibration data")
    p.add_argument("--calib-precision", nargs="+", default=["auto"], choices=["auto", "model", "bfloat16"],
                   help="compress(calib_precision=...); several: each preset is run with each, side by side")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from qruntime import compress
    from qruntime.eval.data import calibration_batches
    from qruntime.recipes.presets import resolve_config
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import evaluate_causal_lm, tokenize_text
    from qruntime.eval.models import load_causal_lm

    model, tok = load_causal_lm(args.model)
    ids = tokenize_text(tok, split_text("eval"), args.eval_tokens)
    rows = []
    for preset in args.preset:
        calib = None
        if resolve_config(preset).needs_calibration:
            calib = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.window)
        held_out = None
        if resolve_config(preset).max_ppl_increase is not None and args.budget_samples:
            held_out = calibration_batches(tok, num_samples=args.budget_samples, seq_len=args.window, split="train")
        for precision in args.calib_precision:
            qmodel, report = compress(model, preset, calib, inplace=False, eval_data=held_out,
                                      calib_precision=precision)
            result = evaluate_causal_lm(qmodel, ids, reference=model, window=args.window, stride=args.stride)
            label = report.config + (f" [{precision}]" if len(args.calib_precision) > 1 else "")
            rows.append({"preset": label, "calib_precision": precision, "report": report.to_dict(),
                         "eval": result.to_dict()})
            del qmodel

    print(f"\nmodel {args.model}; protocol: {rows[0]['eval']['protocol']}; original perplexity "
          f"{rows[0]['eval']['reference_perplexity']:.3f}")
    print(f"{'recipe':<32} {'ppl':>9} {'ppl ratio':>10} {'top-1 agree':>12} {'KL nats/tok':>12} "
          f"{'weights MiB':>12} {'x smaller':>10} {'compress s':>11}")
    for r in rows:
        e, rep = r["eval"], r["report"]
        print(f"{r['preset']:<32} {e['perplexity']:>9.3f} {e['perplexity_ratio']:>10.4f} "
              f"{100 * e['top1_agreement']:>11.2f}% {e['kl_divergence']:>12.5f} "
              f"{rep['weight_bytes_after'] / 2**20:>12.1f} {rep['weight_compression']:>10.2f} {rep['seconds']:>11.1f}")
    write_json(args.json, {"environment": environment(), "args": vars(args), "results": rows})


if __name__ == "__main__":
    main()
