"""The ``qruntime`` command line.

``qruntime demo``: compress the default model (SmolLM2-135M) and print what was gained and lost.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def run_demo(
    model_name: str, preset: str, eval_tokens: int, window: int, calib_samples: int, json_path: str | None
) -> dict:
    import torch

    from . import __version__, compress
    from .calibrate import calibration_batches
    from .config import resolve_config
    from .data import split_text
    from .evaluate import evaluate_causal_lm, tokenize_text
    from .models import load_causal_lm

    cfg = resolve_config(preset)  # a bad recipe fails before the model is loaded
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(model_name)
    load_s = time.perf_counter() - t0
    ids = tokenize_text(tokenizer, split_text("eval"), max_tokens=eval_tokens)

    calib = None
    if cfg.quant.needs_calibration:
        calib = calibration_batches(tokenizer, num_samples=calib_samples, seq_len=window)
    qmodel, report = compress(model, cfg, calib, inplace=False)
    result = evaluate_causal_lm(qmodel, ids, reference=model, window=window)

    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("model", model_name, ""),
        ("recipe", report.config, ""),
        ("parameters", f"{params:,}", ""),
        ("Linear weights converted", f"{len(report.layers)} layers", f"{len(report.skipped)} skipped (heads/embeddings)"),
        ("Linear weight bytes", _fmt_bytes(report.weight_bytes_before), _fmt_bytes(report.weight_bytes_after)),
        ("whole model bytes", _fmt_bytes(report.model_bytes_before), _fmt_bytes(report.model_bytes_after)),
        ("perplexity (Wikipedia eval split)", f"{result.reference_perplexity:.3f}", f"{result.perplexity:.3f}"),
        ("next-token top-1 agreement", "", f"{100 * result.top1_agreement:.2f} %"),
        ("KL(original || compressed)", "", f"{result.kl_divergence:.5f} nats/token"),
    ]
    print()
    print(f"{'':<36} {'original':>20} {'compressed':>24}")
    for label, before, after in rows:
        print(f"{label:<36} {before:>20} {after:>24}")
    print(
        f"\nLinear weights {report.weight_compression:.2f}x smaller; perplexity x{result.perplexity_ratio:.4f}; "
        f"protocol: {result.protocol}."
    )
    print(
        f"time: load {load_s:.1f} s, compress (calibration included) {report.seconds:.1f} s, evaluate both models {result.seconds:.1f} s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU backend: {report.cpu_backend})"
    )
    summary = {
        "qruntime": __version__,
        "torch": torch.__version__,
        "model": model_name,
        "parameters": params,
        "load_seconds": load_s,
        "report": report.to_dict(),
        "eval": result.to_dict(),
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=2)
        print(f"wrote {json_path}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qruntime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compress the default model and report size and accuracy")
    demo.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m), local folder or HF name")
    demo.add_argument("--preset", default="w8a16-gptq", help="w8a16-gptq, w8a16, w4a16-g128, ... (see qruntime.config)")
    demo.add_argument("--calib-samples", type=int, default=16, help="calibration windows (of --window tokens)")
    demo.add_argument("--eval-tokens", type=int, default=16384, help="tokens of the Wikipedia eval split")
    demo.add_argument("--window", type=int, default=512, help="perplexity window (non-overlapping)")
    demo.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            run_demo(args.model, args.preset, args.eval_tokens, args.window, args.calib_samples, args.json)
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"qruntime: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
