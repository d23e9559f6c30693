"""2:4 pruning of a causal LM, one-shot and with the knowledge-distillation recovery, side by side,
scored by perplexity on the evaluation split against the original.

    python bench/sparse_recovery.py --model smollm2-135m --method sparsegpt --minutes 30 \
        --json bench/results/smollm2-135m_cpu_sparse24_recovery.json

Text: calibration (masks, SparseGPT/Wanda statistics) on --calib-samples windows of the calibration
split; recovery training on consecutive windows of the training split, monitored on calibration windows
after those used for calibration; perplexity on the first --eval-tokens tokens of the evaluation split
(as bench/eval_causal_lm.py). The --minutes budget is the recovery training time (time-based LR decay).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--quant", default="", help="weight recipe after 2:4, e.g. w8a16 (default: float values)")
    p.add_argument("--minutes", type=float, default=30.0, help="recovery training budget (0: one-shot only, no recovery run)")
    p.add_argument("--steps", type=int, default=2000, help="upper bound; the time budget usually ends training first")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--alpha-ce", type=float, default=0.0)
    p.add_argument("--autocast", default="auto")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--tune", type=int, default=0,
                   help="block output tuning of the kept weights after pruning, this many steps per block (2:4-tune)")
    p.add_argument("--skip-one-shot", action="store_true", help="do not evaluate the one-shot model separately")
    p.add_argument("--skip", action="append", default=[], metavar="PATTERNS",
                   help="one more one-shot row with these layers kept dense (SparsityConfig.skip): comma-separated "
                        "fnmatch patterns of layer names, e.g. '*.mlp.down_proj'; repeat for more rows")
    p.add_argument("--recovery-skip", default="", metavar="PATTERNS",
                   help="layers the recovery row keeps dense (comma-separated fnmatch patterns; default: none)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.minutes <= 0 and args.skip_one_shot and not args.skip:
        p.error("--minutes 0 (no recovery) with --skip-one-shot leaves nothing to run")
    skip_sets = [_patterns(group) for group in args.skip]
    if any(not patterns for patterns in skip_sets):
        p.error("--skip: give at least one layer-name pattern")

    from qruntime import compress
    from qruntime.eval.data import calibration_batches
    from qruntime.recipes.presets import resolve_config
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import evaluate_causal_lm, tokenize_text
    from qruntime.eval.models import load_causal_lm

    model, tok = load_causal_lm(args.model)
    eval_ids = tokenize_text(tok, split_text("eval"), args.eval_tokens)
    calib = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.calib_len)

    base = "2:4" + ("" if args.method == "sparsegpt" else f"-{args.method}") + (f"-tune{args.tune}" if args.tune else "")
    suffix = f"+{args.quant}" if args.quant else ""
    rows = []
    one_shots = ([] if args.skip_one_shot else [()]) + skip_sets
    for patterns in one_shots:
        cfg = resolve_config(base + suffix)
        cfg = replace(cfg, sparsity=replace(cfg.sparsity, skip=patterns))
        t0 = time.perf_counter()
        one_shot, report = compress(model, cfg, calib, inplace=False)
        seconds = time.perf_counter() - t0
        r = evaluate_causal_lm(one_shot, eval_ids, reference=model)
        rows.append({"recipe": report.config, "skip": list(patterns), "recovery": False, "compress_seconds": seconds,
                     "linear_mib": _linear_mib(one_shot, report), "eval": r.to_dict(), "report": report.to_dict()})
        kept = f", kept dense: {', '.join(patterns)}" if patterns else ""
        print(f"{report.config}{kept}: one-shot perplexity {r.perplexity:.3f} (x{r.perplexity_ratio:.3f}) "
              f"in {seconds:.0f} s", flush=True)
        del one_shot

    train_windows = 0
    if args.minutes > 0:
        row, train_windows = _recovered(args, model, tok, base + "-kd" + suffix, calib, eval_ids)
        rows.append(row)

    ref_ppl = rows[-1]["eval"]["reference_perplexity"]
    print(f"\nmodel {args.model}; {rows[-1]['eval']['protocol']}; original perplexity {ref_ppl:.3f}")
    print(f"{'recipe':<28} {'recovery':>9} {'perplexity':>11} {'ratio':>8} {'top-1 agree':>12} {'minutes':>8} "
          f"{'Linear MiB':>11}  kept dense")
    for row in rows:
        e = row["eval"]
        mib = f"{row['linear_mib']:>11.1f}" if "linear_mib" in row else f"{'':>11}"
        print(f"{row['recipe']:<28} {'yes' if row['recovery'] else 'no':>9} {e['perplexity']:>11.3f} "
              f"{e['perplexity_ratio']:>8.3f} {100 * e['top1_agreement']:>11.2f}% {row['compress_seconds'] / 60:>8.1f} "
              f"{mib}  {', '.join(row.get('skip', [])) or '-'}")
    write_json(args.json, {"environment": environment(), "args": vars(args), "train_windows": train_windows,
                           "results": rows})


def _patterns(text: str) -> tuple[str, ...]:
    """Comma-separated layer-name patterns (``--skip``, ``--recovery-skip``) as SparsityConfig.skip."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _linear_mib(model, report) -> float:
    """MiB of the blocks' linear weights as stored: the converted layers' packed tensors (the report's
    bytes: kept values, positions, scales) plus the float weight of each block layer left dense (the
    report's skipped layers; the output head and embeddings are not counted)."""
    dense = sum(model.get_submodule(s.name).weight.nbytes for s in report.skipped if ".layers." in s.name)
    return (report.weight_bytes_after + dense) / 2**20


def _recovered(args, model, tok, recipe: str, calib, eval_ids) -> tuple[dict, int]:
    """Pruning (as the one-shot row) followed by the knowledge-distillation recovery, in one compress call.
    Returns the row and the number of training windows."""
    import torch

    from qruntime import compress
    from qruntime.calibration.stats import text_batches
    from qruntime.eval.data import calibration_batches
    from qruntime.distill.config import DistillConfig
    from qruntime.recipes.presets import resolve_config
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import evaluate_causal_lm

    # monitoring windows: calibration text after the calibration windows (disjoint from training and eval)
    skip = args.calib_samples * args.calib_len // args.seq_len
    monitor = calibration_batches(tok, num_samples=skip + 4, seq_len=args.seq_len)[skip:]
    train_text = split_text("train")
    n_train = len(tok(train_text, add_special_tokens=False)["input_ids"]) // (args.seq_len * args.batch)
    train = [w.reshape(args.batch, args.seq_len) for w in
             torch.stack(text_batches(tok, train_text, n_train * args.batch, args.seq_len, source="train split"))
             .reshape(n_train, args.batch, args.seq_len)]
    cfg = resolve_config(recipe)
    patterns = _patterns(args.recovery_skip)
    recover = DistillConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, alpha_ce=args.alpha_ce,
                            autocast=args.autocast, eval_every=args.eval_every, max_seconds=args.minutes * 60)
    cfg = replace(cfg, sparsity=replace(cfg.sparsity, recover=recover, skip=patterns))
    t0 = time.perf_counter()
    recovered, report = compress(model, cfg, calib, train_data=train, eval_data=monitor)
    seconds = time.perf_counter() - t0
    r = evaluate_causal_lm(recovered, eval_ids, reference=model)
    print(report)
    return ({"recipe": report.config, "skip": list(patterns), "recovery": True, "compress_seconds": seconds,
             "linear_mib": _linear_mib(recovered, report),
             "recovery_minutes": report.recovery["seconds"] / 60, "eval": r.to_dict(), "report": report.to_dict()},
            len(train) * args.batch)


if __name__ == "__main__":
    main()
