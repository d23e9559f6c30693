"""bench/plot_results.py turns results JSONs into PNGs (kernel speedup vs M, quality vs bytes)."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

from conftest import require_module

require_module("matplotlib", "matplotlib (the test extra) is not installed")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "bench" / "plot_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["plot_results"] = mod
    spec.loader.exec_module(mod)
    return mod


def _is_png(path) -> bool:
    return pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kernel_and_accuracy_plots(tmp_path):
    plot = _module()
    kernels = {"rows": [
        {"shape": s, "M": m, "threads": t, "ms": {"fp32": 1.0}, "speedup_vs_fp32": {"fp32": 1.0, "w8a8": 2.0 + m / 100, "w4a16-g128": 3.0}}
        for s in ("a 64x64", "b 64x128") for m in (1, 8, 128) for t in (1, 2)
    ]}
    accuracy = {"results": [
        {"preset": p, "report": {"weight_bytes_after": b}, "eval": {"perplexity_ratio": r}}
        for p, b, r in (("w8a16", 2**20, 1.002), ("w4a16-g128", 2**19, 1.3))
    ]}
    other = {"rows": [{"recipe": "fp32"}]}
    # results of other shapes (a dict of results, a list of numbers, a top-level list): skipped, not a crash
    others = ({"results": {"a": 1}}, {"results": [1, 2]}, [1, 2], {"rows": {"x": 1}})
    paths = []
    for name, payload in (("k", kernels), ("a", accuracy), ("o", other), *((f"o{i}", p) for i, p in enumerate(others))):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(payload))
    out = tmp_path / "plots"
    assert _is_png(plot.plot_file(str(paths[0]), str(out)))
    assert _is_png(plot.plot_file(str(paths[1]), str(out)))
    for path in paths[2:]:
        assert plot.plot_file(str(path), str(out)) is None, path
    with pytest.raises(ValueError, match="no result"):
        plot.plot_accuracy({"results": [{"preset": "x", "report": {"weight_bytes_after": 1}, "eval": {}}]}, "t", str(out / "x.png"))
