"""CPU kernel microbenchmark: qruntime's C++ kernels vs torch's CPU paths, per layer, side by side.

For every (K, N) layer shape, batch rows M and thread count, times (median of repeated calls):

    fp32        torch F.linear, float32 weights (the baseline of every ratio)
    bf16        torch F.linear, bfloat16 activations and weights
    ao_int8     torch.ao dynamic-quantized int8 Linear (fbgemm)
    int8pack    torch.ops.aten._weight_int8pack_mm (int8 weight-only)
    int4pack    torch.ops.aten._weight_int4pack_mm_for_cpu (int4 weight-only, g128)
    w8a16 / w8a8 / w4a16-g128
                qruntime QuantLinear modules (what compress() puts in a model; round-to-nearest codes)
    w8a8 vnni   on a CPU with AMX-INT8 (dispatched by default), the w8a8 module forced to AVX-512 VNNI
    w8a16 fp32 / w4a16-g128 fp32
                on a level with bf16 products (AVX512-BF16: W8A16 / W4A16 at M >= 16 in bf16), the same
                modules forced to AVX-512 VNNI, whose products stay fp32
    w8a16 amx_bf16 / w4a16-g128 amx_bf16
                on a CPU with AMX-BF16, the modules forced to the opt-in amx_bf16 level

Every cell is measured in --rounds interleaved rounds (each round times every method once; medians over
rounds), so a drift in the machine's speed hits all methods alike. Weights are "cold" by default: each call uses the next of several copies whose total size is well
above the last-level cache, as in a model forward where every layer's weights are read once per step
(`--warm` reuses one copy). Ratios are speedups over fp32 measured in the same run.

    python bench/bench_cpu_kernels.py                   # full sweep (~15 min on 2 cores)
    python bench/bench_cpu_kernels.py --quick           # 4096x4096 and 576x1536, M in {1, 128}
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402

import qruntime  # noqa: E402
from qruntime import QuantConfig  # noqa: E402
from qruntime.formats.packing import quantize_int4, quantize_int8_per_channel, unpack_int4  # noqa: E402
from qruntime.quant.linear import quantize_linear

SHAPES = {  # name: (K, N) = (in_features, out_features)
    "gpt2.attn.c_attn 768x2304": (768, 2304),
    "gpt2.attn.c_proj 768x768": (768, 768),
    "gpt2.mlp.c_fc 768x3072": (768, 3072),
    "gpt2.mlp.c_proj 3072x768": (3072, 768),
    "smollm2.q_proj 576x576": (576, 576),
    "smollm2.up_proj 576x1536": (576, 1536),
    "smollm2.down_proj 1536x576": (1536, 576),
    "7b-class 4096x4096": (4096, 4096),
}
MS = [1, 8, 32, 128, 512]
COLD_BYTES = 96 << 20  # copies of the weights per method: at least this many bytes in rotation


def _methods(k: int, n: int) -> dict[str, tuple[int, callable]]:
    """name -> (bytes of one weight copy, factory() -> fn(x) closed over a fresh weight copy)."""
    w = torch.randn(n, k) / k**0.5
    q8, s8 = quantize_int8_per_channel(w)
    q4, s4, z4, g4 = quantize_int4(w, 128, False)
    b = torch.randn(n)

    def fp32():
        wc = w.clone()
        return lambda x: F.linear(x, wc, b)

    def bf16():
        wc, bc = w.to(torch.bfloat16), b.to(torch.bfloat16)
        return lambda x: F.linear(x.to(torch.bfloat16), wc, bc)

    def ao_int8():
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        qlin = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, torch.qint8)
        return lambda x: qlin(x)

    def int8pack():
        qc, sc = q8.clone(), s8.clone()
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, qc, sc) + b

    def int4pack():
        # torch's format: unsigned codes [N, K] int32, scales_and_zeros [K/g, N, 2] with w = (q - 8) * s + z'
        codes = unpack_int4(q4)[:, :k].to(torch.int32)
        kp = (k + 127) // 128 * 128
        if kp != k:
            return None
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        zero = 8.0 if z4 is None else z4.float()
        sz = torch.stack([s4, (8.0 - zero) * s4], dim=-1).contiguous()
        return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 128, sz) + b

    def qlinear(quant):
        def factory():
            lin = torch.nn.Linear(k, n)
            with torch.no_grad():
                lin.weight.copy_(w)
                lin.bias.copy_(b)
            ql = quantize_linear(lin, quant)
            return lambda x: ql(x)

        return factory

    w8a16 = qlinear(QuantConfig(bits=8))
    w8a8 = qlinear(QuantConfig(bits=8, act_bits=8))
    w4a16 = qlinear(QuantConfig(bits=4, group_size=128, symmetric=False))

    def forced(factory, isa):  # the same module with the kernels forced to another ISA level
        def build():
            fn = factory()

            def run(x):
                with qruntime.ops.registry.use_cpu_isa(isa):
                    return fn(x)

            return run

        return build

    int4_bytes = q4.numel() + s4.numel() * 4 + (0 if z4 is None else z4.numel())
    levels = qruntime.ops.registry.supported_cpu_isas()
    side = {}  # the same modules on other levels, side by side with the default one
    if "amx_int8" in levels:
        side["w8a8 vnni"] = (n * k + n * 4, forced(w8a8, "avx512_vnni"))
    if qruntime.ops.registry.cpu_bf16_rows() is not None:
        side["w8a16 fp32"] = (n * k + n * 4, forced(w8a16, "avx512_vnni"))
        side["w4a16-g128 fp32"] = (int4_bytes, forced(w4a16, "avx512_vnni"))
    if "amx_bf16" in levels:
        side["w8a16 amx_bf16"] = (n * k + n * 4, forced(w8a16, "amx_bf16"))
        side["w4a16-g128 amx_bf16"] = (int4_bytes, forced(w4a16, "amx_bf16"))
    return {
        "fp32": (n * k * 4, fp32),
        "bf16": (n * k * 2, bf16),
        "ao_int8": (n * k, ao_int8),
        "int8pack": (n * k, int8pack),
        "int4pack": (n * k // 2, int4pack),
        "w8a16": (n * k + n * 4, w8a16),
        "w8a8": (n * k + n * 4, w8a8),
        "w4a16-g128": (int4_bytes, w4a16),
        **side,
    }


def _time(fns: list, x: torch.Tensor, budget_s: float, slow_s: float) -> tuple[float, int]:
    """(median seconds of one call, calls timed), cycling through fns (one per weight copy).

    A method whose single call takes longer than ``slow_s`` is timed once (the torch weight-only ops
    at large M run 20-100x slower than fp32; repeating them would take minutes and change nothing)."""
    fns[0](x)
    t0 = time.perf_counter()
    fns[1 % len(fns)](x)
    one = time.perf_counter() - t0
    if one > slow_s:
        return one, 1
    reps = int(min(200, max(5, budget_s / max(one, 1e-6))))
    times = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 128}")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--m", type=int, nargs="+", default=None)
    ap.add_argument("--shapes", nargs="+", default=None, help="substrings of shape names")
    ap.add_argument("--warm", action="store_true", help="one weight copy (cache-resident when it fits)")
    ap.add_argument("--budget", type=float, default=0.3, help="seconds per method and cell (about)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per cell; medians reported")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args(argv)

    shapes = dict(SHAPES)
    ms = args.m or MS
    if args.quick:
        shapes = {k: v for k, v in SHAPES.items() if "4096" in k or "576x1536" in k}
        ms = args.m or [1, 128]
    if args.shapes:
        shapes = {k: v for k, v in shapes.items() if any(s in k for s in args.shapes)}
    env = environment()
    print(f"# {env['cpu']}; torch {env['torch']}; qruntime {env['qruntime']} ({env['cpu_backend']}); "
          f"{'warm' if args.warm else 'cold'} weights")
    rows = []
    torch.manual_seed(0)
    torch.set_grad_enabled(False)  # inference: every method runs without autograd
    for name, (k, n) in shapes.items():
        methods = _methods(k, n)
        fns = {}
        for meth, (nbytes, factory) in methods.items():
            copies = 1 if args.warm else max(1, min(64, -(-COLD_BYTES // nbytes)))
            made = [factory() for _ in range(copies)]
            if made[0] is not None:
                x1 = torch.randn(1, k)
                for fn in made:  # one-time work per copy (e.g. qruntime's CPU layout) is not timed
                    fn(x1)
                fns[meth] = made
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in ms:
                x = torch.randn(m, k)
                # The machine's speed drifts (shared cores): --rounds interleaved rounds, each timing
                # every method once, and the median over rounds.
                per = {meth: [] for meth in fns}
                calls = {meth: 0 for meth in fns}
                slow = float("inf")
                for _ in range(args.rounds):
                    for meth, f in fns.items():
                        t, c = _time(f, x, args.budget / args.rounds, slow if meth != "fp32" else float("inf"))
                        per[meth].append(t)
                        calls[meth] += c
                        if meth == "fp32":
                            slow = max(0.5, 20 * t)
                times = {meth: statistics.median(v) for meth, v in per.items()}
                base = times["fp32"]
                row = {"shape": name, "K": k, "N": n, "M": m, "threads": threads,
                       "ms": {meth: t * 1e3 for meth, t in times.items()},
                       "calls_timed": calls,
                       "speedup_vs_fp32": {meth: base / t for meth, t in times.items()}}
                rows.append(row)
                print(f"{name:30s} M={m:<4d} t={threads}  fp32 {base * 1e3:8.3f} ms  " + "  ".join(
                    f"{meth} x{base / t:.2f}" for meth, t in times.items() if meth != "fp32"), flush=True)
        del fns, methods
    torch.set_num_threads(max(args.threads))
    write_json(args.json, {"environment": env, "cold_weights": not args.warm, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
