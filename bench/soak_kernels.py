"""Numerics under load: many random quantized GEMMs across every op and backend, bounded in time.

Each iteration draws an op (w8a16 / w4a16 / w8a8), a backend (every C++ ISA level this CPU runs, the
registered op, the Triton kernels when a GPU is present or --triton-interpret is given), a shape
(M, K, N from 1 to a few hundred), a group size and symmetry, and an activation dtype; it checks the
result against the float64 oracle (the bound of tests/test_properties.py) and records the error. Every
--window iterations it records the worst error of the window and the process's resident memory, so
drift (errors growing with time) or a leak (memory growing with iterations) shows in the series.

    python bench/soak_kernels.py                       # 10,000 GEMMs or 10 minutes, whichever first
    python bench/soak_kernels.py --iterations 500 --seconds 60 --out /tmp/soak.json

Exit status 1 if any result exceeds its bound, or memory grew by more than --max-growth-mib between the
first and the last window (after warm-up, caches of the per-weight CPU layouts included).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402

from qruntime.ops import registry as ops
from qruntime.ops import reference  # noqa: E402
from qruntime.formats.packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8_per_channel  # noqa: E402

BOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_FN = {"w8a16": "cpu_w8a16", "w8a8": "cpu_w8a8", "w4a16": "cpu_w4a16"}


def rss_mib() -> float:
    """Resident memory of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def one(rng: random.Random, backends: list[str]) -> tuple[str, str, float]:
    op = rng.choice(["w8a16", "w4a16", "w8a8"])
    backend = rng.choice(backends)
    m, k, n = rng.choice([1, 2, 3, 16, 17, rng.randint(1, 200)]), rng.randint(1, 600), rng.randint(1, 300)
    dtype = rng.choice(list(BOUND))
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    x = (torch.randn(m, k, generator=g) * 10 ** (rng.random() * 3 - 1.5)).to(dtype)
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g).to(dtype) if rng.random() < 0.5 else None
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    if op == "w4a16":
        group = rng.choice([None, 16, 32, 64, 128])
        qw, s, z, gs = quantize_int4(w, group, rng.random() < 0.5)
        w_deq = dequantize_int4(qw, s, z, gs, k).double()
        args = (qw, s, z, gs)
    else:
        qw, s = quantize_int8_per_channel(w)
        w_deq = dequantize_int8(qw, s).double()
        args = (qw, s)
    x_eff = x.double()
    if op == "w8a8":
        xq, a = reference.quantize_per_token(x)
        x_eff = xq.double() * a.double()[:, None]
    oracle = x_eff @ w_deq.t() + (0 if bias is None else bias.double())
    magnitude = x_eff.abs() @ w_deq.abs().t() + (0 if bias is None else bias.double().abs())
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    full = tuple(to(t) for t in (x, *args, bias))
    if backend == "op":
        y = getattr(ops, f"{op}_linear")(*full)
    elif backend == "triton":
        from qruntime.ops import triton_backend

        y = getattr(triton_backend.load(op), f"{op}_linear")(*full)
    else:
        with ops.use_cpu_isa(backend):
            y = getattr(ops, CPU_FN[op])(*full)
    err = ((y.cpu().double() - oracle).norm() / magnitude.norm().clamp_min(1e-300)).item()
    return op, backend, err / BOUND[dtype]  # <= 1 within the bound


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10_000)
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--window", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-growth-mib", type=float, default=64)
    p.add_argument("--triton-interpret", action="store_true", help="include the Triton kernels in the interpreter")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "soak_cpu.json"))
    args = p.parse_args(argv)
    if args.triton_interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    backends = ops.supported_cpu_isas() + ["op"]
    if args.triton_interpret or torch.cuda.is_available():
        backends.append("triton")
    rng = random.Random(args.seed)
    windows, worst, counts = [], 0.0, {}
    start = time.perf_counter()
    window_worst, done = 0.0, 0
    while done < args.iterations and time.perf_counter() - start < args.seconds:
        op, backend, ratio = one(rng, backends)
        counts[f"{op}/{backend}"] = counts.get(f"{op}/{backend}", 0) + 1
        window_worst, worst = max(window_worst, ratio), max(worst, ratio)
        done += 1
        if done % args.window == 0:
            windows.append({"iterations": done, "seconds": round(time.perf_counter() - start, 1),
                            "worst_error_over_bound": window_worst, "rss_mib": round(rss_mib(), 1)})
            print(f"{done:7d} GEMMs  {windows[-1]['seconds']:7.1f} s  worst error/bound {window_worst:.3f}  "
                  f"RSS {windows[-1]['rss_mib']:.1f} MiB", flush=True)
            window_worst = 0.0
    growth = windows[-1]["rss_mib"] - windows[0]["rss_mib"] if len(windows) > 1 else 0.0
    ok = worst <= 1.0 and growth <= args.max_growth_mib
    payload = {"environment": environment(), "args": vars(args), "backends": backends, "iterations": done,
               "worst_error_over_bound": worst, "rss_growth_mib": growth, "windows": windows,
               "counts": counts, "ok": ok}
    print(f"{done} GEMMs on {backends}: worst error/bound {worst:.3f}, memory growth {growth:+.1f} MiB "
          f"after the first window -> {'OK' if ok else 'FAIL'}")
    write_json(args.out, payload)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
