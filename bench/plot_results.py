"""PNG plots of the results JSONs in bench/results/ (needs matplotlib: pip install matplotlib).

    python bench/plot_results.py bench/results/*.json --out bench/results/plots

* accuracy files (eval_causal_lm.py / eval_encoder.py output: ``results`` with ``report`` and ``eval``):
  quality vs bytes, one point per recipe: perplexity ratio to fp32 (causal LMs) or 1 - embedding
  cosine (encoders) against the converted weights' bytes.
* kernel files (bench_cpu_kernels.py output: ``rows`` with ``speedup_vs_fp32``): speedup over fp32
  F.linear vs M, one panel per layer shape, one line per method (at the most threads measured).
Each plot's title names its source file; nothing is plotted that the file does not contain.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _accuracy_points(data: dict) -> tuple[str, list[tuple[str, float, float]]]:
    points = []
    metric = "perplexity ratio to fp32"
    for r in data["results"]:
        ev, rep = r["eval"], r["report"]
        mib = rep["weight_bytes_after"] / 2**20
        if ev.get("perplexity_ratio") is not None:
            points.append((r["preset"], mib, ev["perplexity_ratio"]))
        elif ev.get("cosine_mean") is not None:
            metric = "1 - embedding cosine to fp32"
            points.append((r["preset"], mib, 1 - ev["cosine_mean"]))
    return metric, points


def plot_accuracy(data: dict, title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, points = _accuracy_points(data)
    if not points:
        raise ValueError(f"{title}: no result with a perplexity ratio or an embedding cosine")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for _, mib, value in points:
        ax.scatter(mib, value)
    ax.autoscale_view()
    # labels from the lowest point up, each moved up (in points) until it clears the labels already
    # placed near it: recipes of the same bytes and close quality are listed, not overprinted
    placed: list[tuple[float, float]] = []
    to_pt = 72 / fig.dpi
    for name, mib, value in sorted(points, key=lambda p: p[2]):
        x, y = (c * to_pt for c in ax.transData.transform((mib, value)))
        label = y + 4
        while any(abs(label - py) < 10 and abs(x - px) < 90 for px, py in placed):
            label += 10
        placed.append((x, label))
        moved = label - y > 4  # a thin line then leads from the label to its point
        ax.annotate(name, (mib, value), textcoords="offset points", xytext=(14 if moved else 4, label - y), fontsize=8,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="gray", shrinkA=0) if moved else None)
    ax.set_xlabel("converted Linear weights, MiB (packed + scales)")
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_kernels(data: dict, title: str, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    if not rows:
        raise ValueError(f"{title}: no kernel rows")
    threads = max(r["threads"] for r in rows)
    rows = [r for r in rows if r["threads"] == threads]
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    methods = [m for m in rows[0]["speedup_vs_fp32"] if m != "fp32"]
    cols = min(4, len(shapes))
    nrows = -(-len(shapes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), squeeze=False, sharey=True)
    for ax, shape in zip(axes.flat, shapes):
        sub = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["M"])
        for m in methods:
            ms = [r["M"] for r in sub if m in r["speedup_vs_fp32"]]
            ax.plot(ms, [r["speedup_vs_fp32"][m] for r in sub if m in r["speedup_vs_fp32"]], marker="o", label=m)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(shape, fontsize=8)
        ax.set_xlabel("M (tokens)")
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    axes[0][0].set_ylabel("speedup over fp32 F.linear")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{title} ({threads} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(path: str, out_dir: str) -> str | None:
    """Plots one results JSON into ``out_dir``; returns the PNG path, or None for a file of another kind."""
    with open(path) as f:
        data = json.load(f)
    base = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(out_dir, exist_ok=True)
    if not isinstance(data, dict):
        return None
    rows, results = data.get("rows"), data.get("results")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "speedup_vs_fp32" in rows[0]:
        return plot_kernels(data, base, os.path.join(out_dir, f"{base}_speedup.png"))
    if (isinstance(results, list) and results and isinstance(results[0], dict)
            and {"preset", "eval", "report"} <= set(results[0])):
        return plot_accuracy(data, base, os.path.join(out_dir, f"{base}_quality_vs_bytes.png"))
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", help="results JSON files")
    ap.add_argument("--out", default="bench/results/plots")
    args = ap.parse_args(argv)
    for path in args.paths:
        png = plot_file(path, args.out)
        print(f"{path} -> {png}" if png else f"{path}: not an accuracy or kernel results file, skipped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
