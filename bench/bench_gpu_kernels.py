"""GPU kernel microbenchmark: qruntime's Triton kernels vs cuBLAS fp16 ``F.linear``, side by side.

For every (K, N) layer shape and batch rows M, in one run:

    fp16        torch F.linear with fp16 weights (cuBLAS): the baseline of every ratio
    <kernel>/<path>
                w8a16, w4a16-g128 (asymmetric), w8a8, each on every path it has (splitk, gemm,
                dequant) and on "auto" (what qruntime.kernels.dispatch picks: measured per M bucket)
    2:4 kernels (a second pass and table, after the dense-weight table, its target lines and --e2e)
                2:4 (fp16 kept values), 2:4+w8a16, 2:4+w4a16-g128 (asymmetric): the same weight pruned
                to 2:4 (largest 2 of every 4 by magnitude), on splitk, gemm, dequant, sparse
                (torch semi-structured: cuSPARSELt / CUTLASS, where available) and auto; their ratio is
                to the same fp16 dense F.linear row (the unpruned weight, same FLOPs)

Each time is the median of ``triton.testing.do_bench`` (which flushes L2 before every call, so weights
come from HBM as in a model forward). Reported: time, TFLOP/s (2MNK / t), GB/s counting the bytes each
method reads and writes (packed weights + scales/zeros + activations + output), the ratio to fp16, and
the fraction of the copy bandwidth measured in the same run. Also checked: every path's output against
fp16 F.linear on the dequantized weights (relative error). The target lines at the end are computed
from the table.

    python bench/bench_gpu_kernels.py                    # all shapes, M in {1, 2, ..., 4096}
    python bench/bench_gpu_kernels.py --quick            # 7B and SmolLM2 shapes, 7 values of M, and
                                                         # only the paths the dispatcher considers at each M
    python bench/bench_gpu_kernels.py --e2e              # + decode tokens/s of compressed vs fp16 models
    TRITON_INTERPRET=1 python bench/bench_gpu_kernels.py --smoke   # CPU check of the script itself

Writes bench/results/gpu_kernels_<gpu>.json (rewritten after every shape, so a run cut short keeps
what it measured).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402

SHAPES = {  # name: (K, N) = (in_features, out_features)
    "gpt2 attn.c_attn 768x2304": (768, 2304),
    "gpt2 attn.c_proj 768x768": (768, 768),
    "gpt2 mlp.c_fc 768x3072": (768, 3072),
    "gpt2 mlp.c_proj 3072x768": (3072, 768),
    "smollm2 q_proj 576x576": (576, 576),
    "smollm2 up_proj 576x1536": (576, 1536),
    "smollm2 down_proj 1536x576": (1536, 576),
    "7b q_proj 4096x4096": (4096, 4096),
    "7b up_proj 4096x14336": (4096, 14336),
    "7b down_proj 14336x4096": (14336, 4096),
}
QUICK_SHAPES = [name for name in SHAPES if name.startswith(("7b", "smollm2"))]
M_ALL = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096)
M_QUICK = (1, 4, 16, 64, 256, 1024, 4096)
KERNELS = {"w8a16": ("splitk", "gemm", "dequant"), "w4a16-g128": ("splitk", "gemm", "dequant"),
           "w8a8": ("splitk", "gemm")}
SP24_KERNELS = {name: ("splitk", "gemm", "dequant", "sparse") for name in ("2:4", "2:4+w8a16", "2:4+w4a16-g128")}


def dispatch_kind(kernel: str) -> str:
    """The kind qruntime.kernels.dispatch knows the method by."""
    return "sp24" if kernel in SP24_KERNELS else kernel.split("-")[0]


def timer(device: str, warmup_ms: int, rep_ms: int):
    """median milliseconds of fn(): do_bench on CUDA; perf_counter under the interpreter (smoke only)."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")

    def cpu(fn):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu


def copy_bandwidth(device: str, time_ms) -> float:
    """GB/s of a device-to-device copy (bytes read + written), the ceiling of a memory-bound kernel."""
    n = (1 << 30) if device == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6


def layer(kernel: str, w: torch.Tensor):
    """(fn(x) -> y per path, bytes of the packed weights + scales/zeros, dequantized weight fp16)."""
    from qruntime.formats.packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8_per_channel
    from qruntime.kernels import w4a16, w8a8, w8a16

    n, k = w.shape
    if kernel == "w4a16-g128":
        q, s, z, gs = quantize_int4(w, 128, False)
        wbytes = q.numel() + s.numel() * 4 + z.numel()
        deq = dequantize_int4(q, s, z, gs, k).half()
        return (lambda x, path: w4a16.w4a16_linear(x, q, s, z, gs, None, path=path)), wbytes, deq
    q, s = quantize_int8_per_channel(w)
    wbytes = q.numel() + s.numel() * 4
    deq = dequantize_int8(q, s).half()
    fn = w8a16.w8a16_linear if kernel == "w8a16" else w8a8.w8a8_linear
    return (lambda x, path: fn(x, q, s, None, path=path)), wbytes, deq


def sp24_layer(kernel: str, w: torch.Tensor):
    """As :func:`layer` for the 2:4 methods (``w`` pruned to 2:4 by magnitude first), plus
    ``sparse_reason(x)``: why the semi-structured path cannot run for x (None when it can)."""
    from qruntime.formats.packing import (
        dequantize_sp24, int4_codes, int4_params, nm_mask, pack_sp24, quantize_int8_per_channel, sp24_padded_k,
    )
    from qruntime.kernels import sp24

    n, k = w.shape
    pruned = w * nm_mask(w.abs())
    scales = zeros = None
    gs = 0
    if kernel == "2:4":
        values, meta = pack_sp24(pruned.half())
    elif kernel == "2:4+w8a16":
        kept, meta = pack_sp24(pruned)
        values, scales = quantize_int8_per_channel(kept)
    else:  # 2:4+w4a16-g128: the scales / zero points of the dense pruned weight padded to Kp
        kp = sp24_padded_k(k, 128)
        padded = torch.zeros(n, kp, device=w.device)
        padded[:, :k] = pruned
        scales, zeros, gs = int4_params(padded, 128, False)
        kept, meta = pack_sp24(pruned, 128)
        values = int4_codes(kept, scales, zeros, gs // 2)
    wbytes = sum(t.numel() * t.element_size() for t in (values, meta, scales, zeros) if t is not None)
    deq = dequantize_sp24(values, meta, scales, zeros, gs, k).half()

    def sparse_reason(x):
        reason = sp24.semi_structured_supported(x, n)
        if reason is None and sp24.semi_structured(values, meta, scales, zeros, gs, k, x.dtype) is None:
            reason = "conversion or probe product failed (see the warning)"
        return reason

    return (lambda x, path: sp24.sp24_linear(x, values, meta, scales, zeros, gs, None, path=path)), wbytes, deq, \
        sparse_reason


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def run_kernels(args, device: str, time_ms, rows: list, payload: dict, kernels: list | None = None,
                baseline: dict | None = None) -> None:
    """Times ``kernels`` (default: args.kernels) on every shape and M. ``baseline`` maps (shape, M) to the
    fp16 F.linear time measured in an earlier pass of this run (its row is not repeated)."""
    from qruntime.kernels import dispatch

    kernels = args.kernels if kernels is None else kernels
    baseline = {} if baseline is None else baseline
    shapes = {name: SHAPES[name] for name in (QUICK_SHAPES if args.quick else SHAPES)}
    ms = M_QUICK if args.quick else M_ALL
    if args.smoke:
        shapes, ms = {"smoke 200x144": (200, 144)}, (1, 17)
    for name, (k, n) in shapes.items():
        torch.manual_seed(0)
        w = torch.randn(n, k, device=device) * 0.02
        w16 = w.half()
        layers = {kernel: (sp24_layer(kernel, w) if kernel in SP24_KERNELS else layer(kernel, w) + (None,))
                  for kernel in kernels}
        for m in ms:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            act_bytes = (m * k + m * n) * 2
            if (name, m) not in baseline:
                t16 = baseline[name, m] = time_ms(lambda: F.linear(x, w16))
                rows.append(dict(shape=name, K=k, N=n, M=m, method="fp16", path="cublas", ms=t16,
                                 tflops=2 * m * n * k / t16 / 1e9, gbs=(n * k * 2 + act_bytes) / t16 / 1e6, ratio=1.0))
            t16 = baseline[name, m]
            for kernel, (fn, wbytes, deq, sparse_reason) in layers.items():
                ref = F.linear(x, deq)
                # --quick: only the paths the dispatcher would consider at this M (fewer autotuning runs)
                kind = dispatch_kind(kernel)
                paths = dispatch.candidates(kind, m) if args.quick else {**KERNELS, **SP24_KERNELS}[kernel]
                for path in ("auto",) + tuple(paths):
                    if path == "sparse":
                        reason = sparse_reason(x)
                        if reason is not None:  # not timed: it would be the dequant path under another name
                            note = f"{kernel} sparse path not measured ({name}, M={m}): {reason}"
                            if note not in payload.setdefault("notes", []):
                                payload["notes"].append(note)
                            continue
                    call = (lambda fn=fn, p=path: fn(x, None if p == "auto" else p))
                    err = rel_error(call(), ref)
                    t = time_ms(call)
                    chosen = f"auto:{dispatch.last_path()}" if path == "auto" else path
                    rows.append(dict(shape=name, K=k, N=n, M=m, method=kernel, path=chosen, ms=t,
                                     tflops=2 * m * n * k / t / 1e9, gbs=(wbytes + act_bytes) / t / 1e6,
                                     ratio=t16 / t, rel_err=err))
        payload["rows"] = rows
        write_json(args.out, payload)  # after every shape: a run cut short keeps what it measured


def summarize(rows: list, copy_gbs: float) -> list[str]:
    """The issue's targets, computed from the measured rows (never asserted from memory)."""
    def pick(method, pred, path="auto"):
        return [r for r in rows if r["method"] == method and r["path"].startswith(path) and pred(r)]

    lines = []
    seven = lambda r: r["shape"].startswith("7b")  # noqa: E731
    sel = pick("w4a16-g128", lambda r: seven(r) and r["M"] <= 16)
    if sel:
        lines.append(f"W4A16 g128, 7B shapes, M<=16: min {min(r['ratio'] for r in sel):.2f}x fp16 (target >= 3.5x), "
                     f"min {min(r['gbs'] for r in sel) / copy_gbs:.0%} of copy bandwidth (target >= 80%)")
    sel = pick("w8a16", lambda r: r["M"] <= 16)
    if sel:
        lines.append(f"W8A16, M<=16: min {min(r['ratio'] for r in sel):.2f}x fp16 (target >= 1.85x)")
    sel = pick("w8a8", lambda r: r["M"] >= 1024)
    if sel:
        lines.append(f"W8A8, M>=1024: min {min(r['ratio'] for r in sel):.2f}x fp16 (target >= 1.6x)")
    sel = [r for r in rows if r["path"].startswith("auto") and r["method"] not in SP24_KERNELS]
    if sel:
        worst = min(sel, key=lambda r: r["ratio"])
        lines.append(f"dispatched path, any M: min {worst['ratio']:.2f}x fp16 ({worst['method']} {worst['shape']} "
                     f"M={worst['M']}; target >= 0.95x)")
    # 2:4: measured ratios only (no target is set for them)
    for method in SP24_KERNELS:
        for label, pred in (("M<=16", lambda r: r["M"] <= 16), ("M>=256", lambda r: r["M"] >= 256)):
            sel = pick(method, pred)
            if sel:
                worst, best = min(sel, key=lambda r: r["ratio"]), max(sel, key=lambda r: r["ratio"])
                lines.append(f"{method} dispatched, {label}: {worst['ratio']:.2f}x .. {best['ratio']:.2f}x fp16 "
                             f"(min: {worst['shape']} M={worst['M']} via {worst['path']})")
    sel = [r for r in rows if r["method"] in SP24_KERNELS and r["path"] == "sparse" and r["M"] >= 256]
    if sel:
        lines.append(f"2:4 semi-structured (sparse path), M>=256: {min(r['ratio'] for r in sel):.2f}x .. "
                     f"{max(r['ratio'] for r in sel):.2f}x fp16")
    return lines


def e2e(args, device: str, payload: dict) -> None:
    """Greedy decode tokens/s, batch 1: fp16 model vs the same model compressed (random weights: the
    speed of a decode step does not depend on the values; the configs are SmolLM2-135M's and a
    Llama-3.2-1B-sized one)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import qruntime

    configs = {
        "smollm2-135m (30 x 576)": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
        "llama-1b-sized (16 x 2048)": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    }
    if args.smoke:
        configs = {"tiny (2 x 64)": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256)}
    new_tokens = 4 if args.smoke else 128
    out = []
    for name, cfg in configs.items():
        for recipe in ("fp16", "w8a16", "w4a16-g128-rtn", "w8a8-nosq"):
            torch.manual_seed(0)
            # built and compressed on the device (round-to-nearest runs where the weights are)
            model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=1024)).eval()
            model = model.to(device, torch.float16)
            if recipe != "fp16":
                model, _ = qruntime.compress(model, recipe, progress=False)
            ids = torch.randint(0, cfg["vocab_size"], (1, 32), device=device)
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            with torch.no_grad():
                model.generate(ids, **kwargs)  # warm-up: compile, autotune, dispatch measurements
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, **kwargs)
                if device == "cuda":
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
            out.append(dict(model=name, recipe=recipe, tokens_per_s=new_tokens / dt))
            print(f"e2e {name:28s} {recipe:15s} {new_tokens / dt:9.1f} tok/s")
            del model
    base = {r["model"]: r["tokens_per_s"] for r in out if r["recipe"] == "fp16"}
    for r in out:
        r["ratio"] = r["tokens_per_s"] / base[r["model"]]
    payload["e2e_decode"] = out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="7B and SmolLM2 shapes, M in " + str(M_QUICK))
    p.add_argument("--kernels", nargs="+", default=list(KERNELS) + list(SP24_KERNELS),
                   choices=list(KERNELS) + list(SP24_KERNELS))
    p.add_argument("--e2e", action="store_true", help="also time greedy decode of compressed vs fp16 models")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=100)
    p.add_argument("--out", default=None, help="JSON path (default bench/results/gpu_kernels_<gpu>.json)")
    args = p.parse_args(argv)

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
        device = "cpu"
    elif not torch.cuda.is_available():
        p.error("no CUDA GPU: this benchmark measures the Triton kernels on an NVIDIA GPU (--smoke checks the "
                "script on the CPU)")
    else:
        device = "cuda"
    env = environment()
    gpu = env["cuda"] or "interpreter"
    if args.out is None:
        slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"gpu_kernels_{slug}.json")
    import triton

    env["triton"] = triton.__version__
    time_ms = timer(device, args.warmup_ms, args.rep_ms)
    copy_gbs = copy_bandwidth(device, time_ms)
    payload = {"environment": env, "copy_gbs": copy_gbs, "args": vars(args), "rows": []}
    print(f"{gpu}: copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    rows: list = []
    baseline: dict = {}  # (shape, M) -> fp16 F.linear ms, shared by both passes
    run_kernels(args, device, time_ms, rows, payload, [k for k in args.kernels if k in KERNELS], baseline)

    print(f"\n{'shape':28s} {'M':>5s} {'method':11s} {'path':13s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} "
          f"{'%copy':>6s} {'x fp16':>7s} {'rel err':>8s}")
    for r in rows:
        print(f"{r['shape']:28s} {r['M']:5d} {r['method']:11s} {r['path']:13s} {r['ms']:9.4f} {r['tflops']:8.2f} "
              f"{r['gbs']:7.0f} {r['gbs'] / copy_gbs:6.0%} {r['ratio']:7.2f} {r.get('rel_err', 0.0):8.1e}")
    payload["targets"] = summarize(rows, copy_gbs)
    print("\n" + "\n".join(payload["targets"]))
    if args.e2e:
        e2e(args, device, payload)
    write_json(args.out, payload)

    # the 2:4 methods last: a run cut short (e.g. by a time limit) keeps everything above
    sp24_kernels = [k for k in args.kernels if k in SP24_KERNELS]
    if sp24_kernels:
        first = len(rows)
        run_kernels(args, device, time_ms, rows, payload, sp24_kernels, baseline)
        # GB/s counts the bytes read: kept values + 2-bit metadata + scales / zero points + activations + output
        print(f"\n2:4 sparse (x fp16: vs the fp16 dense F.linear rows, same shape and M)\n"
              f"{'shape':28s} {'M':>5s} {'method':14s} {'path':13s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} "
              f"{'%copy':>6s} {'x fp16':>7s} {'rel err':>8s}")
        for r in rows[first:]:
            print(f"{r['shape']:28s} {r['M']:5d} {r['method']:14s} {r['path']:13s} {r['ms']:9.4f} "
                  f"{r['tflops']:8.2f} {r['gbs']:7.0f} {r['gbs'] / copy_gbs:6.0%} {r['ratio']:7.2f} "
                  f"{r.get('rel_err', 0.0):8.1e}")
        for note in payload.get("notes", []):
            print(note)
        before = len(payload["targets"])
        payload["targets"] = summarize(rows, copy_gbs)
        print("\n" + "\n".join(payload["targets"][before:]))
        write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
