"""2:4-sparse CPU kernel microbenchmark: qruntime's C++ sp24 kernel vs dense torch fp32, side by side.

For every (K, N) layer shape, batch rows M and thread count, times (median of repeated calls):

    fp32          torch F.linear, float32 weights (the baseline of every ratio)
    w8a16         qruntime's dense INT8 weight-only QuantLinear (for comparison)
    sp24-fp32     2:4 weights, float32 kept values
    sp24-bf16     2:4 weights, bfloat16 kept values (float32 activations and output)
    sp24-int8     2:4 weights, INT8 kept values, per-row scales (round to nearest on the pruned weight)
    sp24-int4-g128  2:4 weights, INT4 kept values, asymmetric groups of 128 columns

The 2:4 methods call ``qruntime.ops.registry.run_sp24_module`` on a holder of the canonical tensors: the kernel
path of a 2:4 module in eager mode (the CPU layout is built once per weight, before timing). Cells are
measured in --rounds interleaved rounds (medians over rounds) with cold weights (each call uses the next of
several copies totalling > 96 MiB) exactly as bench_cpu_kernels.py. GB/s counts the packed bytes the kernel
reads (kept values, metadata, scales; fp32: the dense weight).

    python bench/bench_cpu_sp24.py --json bench/results/cpu_sp24.json     # ~1 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json
from bench_cpu_kernels import COLD_BYTES, _time

from qruntime import QuantConfig
from qruntime.ops import registry as ops
from qruntime.quant.linear import quantize_linear
from qruntime.formats.packing import (
    nm_mask,
    pack_int4,
    pack_sp24,
    quantize_int4,
    quantize_int8_per_channel,
    sp24_padded_k,
    sp24_positions,
    unpack_int4,
)

SHAPES = {  # name: (K, N) = (in_features, out_features)
    "7b-class 4096x4096": (4096, 4096),
    "smollm2.up_proj 576x1536": (576, 1536),
    "smollm2.down_proj 1536x576": (1536, 576),
}
MS = [1, 8, 32, 128]


class _Sparse:
    """The attributes ``run_sp24_module`` reads."""

    def __init__(self, values, meta, scales, zeros, group_size, bias, n):
        self.values, self.meta, self.scales, self.zeros = values, meta, scales, zeros
        self.group_size, self.bias, self.out_features = group_size, bias, n

    def clone(self) -> _Sparse:
        c = lambda t: None if t is None else t.clone()
        return _Sparse(c(self.values), c(self.meta), c(self.scales), c(self.zeros), self.group_size, self.bias,
                       self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.scales, self.zeros)
                   if t is not None)


def _kept(dense_codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The codes [N, Kp/2] of the kept positions of dense codes [N, <= Kp] (zero padded)."""
    n, kp = meta.shape[0], meta.shape[1] * 8
    padded = torch.zeros(n, kp, dtype=dense_codes.dtype)
    padded[:, : dense_codes.shape[1]] = dense_codes
    return torch.gather(padded, 1, sp24_positions(meta))


def _sparse_layers(w: torch.Tensor, b: torch.Tensor) -> dict[str, _Sparse]:
    """The 2:4 variants of the pruned weight ``w`` [N, K] (scales of the dense formats on the pruned
    weight, as docs/formats.md defines them)."""
    n, k = w.shape
    values, meta = pack_sp24(w)
    q8, s8 = quantize_int8_per_channel(w)
    q4, s4, z4, gs = quantize_int4(w, 128, False)
    _, meta4 = pack_sp24(w, 128)
    assert q4.shape[1] * 2 == sp24_padded_k(k, 128)
    return {
        "sp24-fp32": _Sparse(values, meta, None, None, 0, b, n),
        "sp24-bf16": _Sparse(values.to(torch.bfloat16), meta, None, None, 0, b, n),
        "sp24-int8": _Sparse(_kept(q8, meta), meta, s8, None, 0, b, n),
        "sp24-int4-g128": _Sparse(pack_int4(_kept(unpack_int4(q4), meta4)), meta4, s4, z4, gs, b, n),
    }


def _methods(k: int, n: int) -> dict[str, tuple[int, callable]]:
    """name -> (bytes of one weight copy, factory() -> fn(x) closed over a fresh weight copy)."""
    w = torch.randn(n, k) / k**0.5
    w = w * nm_mask(w.abs())  # every method multiplies the same pruned weight
    b = torch.randn(n)

    def fp32():
        wc = w.clone()
        return lambda x: F.linear(x, wc, b)

    def w8a16():
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        ql = quantize_linear(lin, QuantConfig(bits=8))
        return lambda x: ql(x)

    def sparse(layer: _Sparse):
        def factory():
            mod = layer.clone()
            return lambda x: ops.run_sp24_module(mod, x)

        return factory

    out = {"fp32": (n * k * 4, fp32), "w8a16": (n * k + n * 4, w8a16)}
    for name, layer in _sparse_layers(w, b).items():
        out[name] = (layer.nbytes(), sparse(layer))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--m", type=int, nargs="+", default=MS)
    ap.add_argument("--shapes", nargs="+", default=None, help="substrings of shape names")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per method and cell (about)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell; medians reported")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    shapes = {k: v for k, v in SHAPES.items() if not args.shapes or any(s in k for s in args.shapes)}
    env = environment()
    print(f"# {env['cpu']}; torch {env['torch']}; qruntime {env['qruntime']} ({env['cpu_backend']}); cold weights")
    rows = []
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    for name, (k, n) in shapes.items():
        methods = _methods(k, n)
        fns, nbytes = {}, {}
        for meth, (size, factory) in methods.items():
            made = [factory() for _ in range(max(1, min(64, -(-COLD_BYTES // size))))]
            x1 = torch.randn(1, k)
            for fn in made:  # one-time work per copy (the CPU layouts) is not timed
                fn(x1)
            fns[meth], nbytes[meth] = made, size
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.m:
                x = torch.randn(m, k)
                per = {meth: [] for meth in fns}
                calls = {meth: 0 for meth in fns}
                for _ in range(args.rounds):
                    for meth, f in fns.items():
                        t, c = _time(f, x, args.budget / args.rounds, float("inf"))
                        per[meth].append(t)
                        calls[meth] += c
                times = {meth: statistics.median(v) for meth, v in per.items()}
                base = times["fp32"]
                row = {"shape": name, "K": k, "N": n, "M": m, "threads": threads,
                       "ms": {meth: t * 1e3 for meth, t in times.items()},
                       "weight_bytes": nbytes,
                       "gb_per_s": {meth: nbytes[meth] / t / 1e9 for meth, t in times.items()},
                       "calls_timed": calls,
                       "speedup_vs_fp32": {meth: base / t for meth, t in times.items()}}
                rows.append(row)
                print(f"{name:28s} M={m:<4d} t={threads}  fp32 {base * 1e3:8.3f} ms  " + "  ".join(
                    f"{meth} x{base / t:.2f}" for meth, t in times.items() if meth != "fp32"), flush=True)
        del fns, methods
    torch.set_num_threads(max(args.threads))

    meths = list(rows[0]["ms"]) if rows else []
    print("\nspeedup over fp32 F.linear (same run; median of rounds); fp32 in ms; GB/s of the packed weights")
    print("| shape | M | threads | fp32 ms | " + " | ".join(meths[1:]) + " | "
          + " | ".join(f"{m} GB/s" for m in meths) + " |")
    print("|---" * (4 + 2 * len(meths) - 1) + "|")
    for r in rows:
        print(f"| {r['shape']} | {r['M']} | {r['threads']} | {r['ms']['fp32']:.3f} | "
              + " | ".join(f"{r['speedup_vs_fp32'][m]:.2f}" for m in meths[1:]) + " | "
              + " | ".join(f"{r['gb_per_s'][m]:.1f}" for m in meths) + " |")
    write_json(args.json, {"environment": env, "cold_weights": True, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
