"""Markdown table of a bench_cpu_kernels.py JSON: speedup over fp32 F.linear per shape, M and method.

    python bench/summarize_cpu_kernels.py bench/results/cpu_kernels.json --threads 2 --m 1 128
"""
from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--m", type=int, nargs="+", default=None)
    args = ap.parse_args(argv)
    with open(args.path) as f:
        data = json.load(f)
    rows = [r for r in data["rows"] if r["threads"] == args.threads and (args.m is None or r["M"] in args.m)]
    if not rows:
        raise SystemExit(f"{args.path}: no rows with threads={args.threads} and M in {args.m}")
    methods = [m for m in rows[0]["speedup_vs_fp32"] if m != "fp32"]
    print("| layer (K x N) | M | fp32 ms | " + " | ".join(methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for r in rows:
        cells = [f"{r['speedup_vs_fp32'][m]:.2f}x" if m in r["speedup_vs_fp32"] else "n/a" for m in methods]
        print(f"| {r['shape']} | {r['M']} | {r['ms']['fp32']:.3f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
