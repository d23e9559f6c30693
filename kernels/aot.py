"""Compiles the quantized-GEMM and 2:4-sparse Triton kernels for an NVIDIA GPU ahead of time, on any machine,
no GPU needed (a representative config of each path, or with ``--all`` every autotuning config).

Triton lowers each kernel to PTX and a cubin with its bundled ptxas for the target architecture, so this
catches, without a GPU: kernels that do not compile for real hardware (the interpreter accepts more than
the compiler does), configs whose shared memory exceeds the target's limit (which the autotuning pruner
must have dropped), kernels that do not use the instructions they exist for (Tensor Core MMA on
fp16 / bf16 / int8 operands, IEEE division and round-to-nearest-even in the activation quantizer), and
weight tiles read one byte per instruction instead of through cp.async / vector loads. Kernels are
specialized as the JIT does for a typical launch (aligned pointers, unit strides, sizes multiple of 16).

    python -m qruntime.kernels.aot                 # a representative config of each path, sm_80 and sm_90
    python -m qruntime.kernels.aot --all           # every autotuning config (~100 compiles)
    python -m qruntime.kernels.aot --json out.json

Must run without TRITON_INTERPRET (the interpreter replaces the kernels by NumPy functions); exits 1
when a kernel fails to compile or a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

# (arch, shared memory a block may use, bytes): A100 / H100-H200 opt-in limits
TARGETS = {80: 163 * 1024, 90: 227 * 1024}
ACT = {"fp16": "*fp16", "bf16": "*bf16"}
MMA = {"fp16": r"mma\S*\.f16", "bf16": r"mma\S*\.bf16"}  # mma.sync (sm_80) or wgmma (sm_90) on 16-bit operands


def _variants(all_configs: bool):
    """(name, kernel, signature, constexprs, config, instruction regex) for every case to compile."""
    from . import w4a16, w8a8, w8a16

    def pick(configs):
        return configs if all_configs else configs[:1]

    for act in ACT:
        for path, configs in (("splitk", w8a16.SPLITK_CONFIGS), ("gemm", w8a16.GEMM_CONFIGS)):
            for cfg in pick(configs):
                sig = {"x_ptr": ACT[act], "w_ptr": "*i8", "scales_ptr": "*fp32", "bias_ptr": ACT[act],
                       "out_ptr": "*fp32" if path == "splitk" else ACT[act]}
                yield (f"w8a16 {act} {path}", w8a16._w8a16_kernel, sig,
                       dict(HAS_BIAS=True, DOT=0), cfg, MMA[act])
        for path, configs in (("splitk", w4a16.SPLITK_CONFIGS), ("gemm", w4a16.GEMM_CONFIGS)):
            for cfg in pick(configs):
                for per_channel, has_zeros in ((False, True), (True, False)):
                    if all_configs and per_channel:
                        continue
                    sig = {"x_ptr": ACT[act], "w_ptr": "*u8", "scales_ptr": "*fp32", "zeros_ptr": "*u8",
                           "bias_ptr": ACT[act], "out_ptr": "*fp32" if path == "splitk" else ACT[act]}
                    kind = "per-channel sym" if per_channel else "g128 asym"
                    yield (f"w4a16 {act} {path} {kind}", w4a16._w4a16_kernel, sig,
                           dict(HAS_ZEROS=has_zeros, HAS_BIAS=False, PER_CHANNEL=per_channel, DOT=0), cfg,
                           MMA[act])
        sig = {"x_ptr": ACT[act], "xq_ptr": "*i8", "a_ptr": "*fp32"}
        yield (f"quantize_per_token {act}", w8a8._quantize_per_token_kernel, sig,
               dict(BLOCK_K=w8a8.QUANT_BLOCK_K, USE_RINT=True), None, r"cvt\.rni\.f32\.f32")
    for path, configs in (("splitk", w8a8.SPLITK_CONFIGS), ("gemm", w8a8.GEMM_CONFIGS)):
        for cfg in pick(configs):
            sig = {"xq_ptr": "*i8", "w_ptr": "*i8", "a_ptr": "*fp32", "scales_ptr": "*fp32", "bias_ptr": "*fp16",
                   "out_ptr": "*fp32" if path == "splitk" else "*fp16"}
            yield (f"w8a8 {path}", w8a8._w8a8_kernel, sig, dict(HAS_BIAS=True), cfg, r"mma\S*\.s8")
    yield from _sp24_variants(all_configs, pick)


def _sp24_variants(all_configs: bool, pick):
    """The 2:4 kernel for each kept-value format (float in x's dtype, INT8 per-row scales, INT4 with
    group scales and zero points, INT4 per-channel symmetric) and path, and the dense-expansion kernel of
    the ``dequant`` path. The kept values are expanded to x's dtype before the dot, so every format must
    reach the Tensor Cores on 16-bit operands."""
    from . import sp24

    values = {"float": (sp24.FLOAT, None, False, False), "int8": (sp24.INT8, "*i8", False, True),
              "int4 g128 asym": (sp24.INT4, "*u8", True, False), "int4 per-channel sym": (sp24.INT4, "*u8", False, True)}
    for act in ACT:
        for path, configs in (("splitk", sp24.SPLITK_CONFIGS), ("gemm", sp24.GEMM_CONFIGS)):
            for cfg in pick(configs):
                for kind, (code, vptr, has_zeros, per_channel) in values.items():
                    if all_configs and kind not in ("float", "int4 g128 asym"):
                        continue
                    sig = {"x_ptr": ACT[act], "values_ptr": vptr or ACT[act], "meta_ptr": "*u8",
                           "scales_ptr": "*fp32", "zeros_ptr": "*u8", "bias_ptr": ACT[act],
                           "out_ptr": "*fp32" if path == "splitk" else ACT[act]}
                    yield (f"sp24 {act} {path} {kind}", sp24._sp24_kernel, sig,
                           dict(VALUES=code, HAS_ZEROS=has_zeros, HAS_BIAS=True, PER_CHANNEL=per_channel, DOT=0),
                           cfg, MMA[act])
        for kind, (code, vptr, has_zeros, _) in values.items():
            if kind == "int4 per-channel sym":
                continue  # the same kernel body as the grouped one, one group
            sig = {"values_ptr": vptr or ACT[act], "meta_ptr": "*u8", "scales_ptr": "*fp32", "zeros_ptr": "*u8",
                   "out_ptr": ACT[act]}
            yield (f"sp24 dequant {act} {kind}", sp24._dequant_sp24_kernel, sig,
                   dict(VALUES=code, HAS_ZEROS=has_zeros, BLOCK_N=64, BLOCK_K=128), None, r"st\.global")


UNIT_STRIDES = ("stride_xk", "stride_wk", "stride_on")  # contiguous along K / N: the JIT makes them constants
UNHINTED = ("M", "m_bucket")  # do_not_specialize


def _specialize(kernel, pointers: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT builds them for a typical launch: 16-byte aligned
    pointers, unit strides as constants, sizes and other strides multiples of 16 (as in every model
    shape benchmarked), M unspecialized. Without these hints the compiler could not vectorize loads and
    the PTX would not be what runs."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in constexprs:
            sig[name] = "constexpr"
        elif name in UNIT_STRIDES:
            sig[name] = "constexpr"
            consts[name] = 1
        else:
            sig[name] = "i32"
            if name not in UNHINTED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def byte_loads(ptx: str) -> int:
    """Global loads of one byte per instruction in ``ptx``: a weight tile read this way would run far
    below the memory bandwidth (the tiles must go through cp.async or vector loads). A few are expected
    for per-channel uint8 zero points."""
    return len(re.findall(r"ld\.global(?:\.\w+)*\.[bsu]8\s", ptx))


MAX_BYTE_LOADS = 4


def compile_all(arch: int, all_configs: bool = False, log=print) -> list[dict]:
    """Compiles every variant for sm_<arch>; one result dict per variant (never raises on a kernel)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._common import fits
    from .sp24 import drops_for_int4_zeros

    results = []
    for name, kernel, pointers, flags, cfg, pattern in _variants(all_configs):
        meta = dict(flags, **(cfg.kwargs if cfg is not None else {}))
        options = {"num_warps": cfg.num_warps if cfg else 4, "num_stages": cfg.num_stages if cfg else 1}
        label = name + ("" if cfg is None else " BM{BLOCK_M} BN{BLOCK_N} BK{BLOCK_K} SK{SPLIT_K}".format(**cfg.kwargs)
                        + f" w{options['num_warps']} s{options['num_stages']}")
        row = {"arch": f"sm_{arch}", "kernel": label}
        t0 = time.perf_counter()
        try:
            sig, consts, attrs = _specialize(kernel, pointers, meta)
            src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:  # a compile error is a result to report, not a crash of the tool
            row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            results.append(row)
            log(f"FAIL  sm_{arch} {label}: {row['error']}")
            continue
        ptx = compiled.asm["ptx"]
        shared = int(compiled.metadata.shared)
        row.update(seconds=round(time.perf_counter() - t0, 2), shared_bytes=shared,
                   shared_fits=shared <= TARGETS[arch], instructions_ok=bool(re.search(pattern, ptx)))
        if name.startswith("quantize"):
            row["instructions_ok"] = "cvt.rni.f32.f32" in ptx and "div.rn.f32" in ptx
        # a config over the limit may exist, but the autotuning pruner's estimate must then drop it
        row["pruned"] = cfg is not None and not fits(
            cfg, x_bytes=1 if name.startswith("w8a8") else 2, w_bytes=1, k=1 << 16,
            group_size=128 if "g128" in name else None, smem_limit=TARGETS[arch],
            min_block_k=32 if name.startswith("w8a8") else 16)
        row["byte_loads"] = byte_loads(ptx)
        # the 2:4 pruner drops a few configs for grouped INT4 values with zero points (kernels/sp24.py)
        row["pruned_for_byte_loads"] = bool(cfg is not None and name.startswith("sp24") and "g128 asym" in name
                                            and drops_for_int4_zeros(cfg))
        row["ok"] = (row["instructions_ok"] and (row["shared_fits"] or row["pruned"])
                     and (row["byte_loads"] <= MAX_BYTE_LOADS or row["pruned_for_byte_loads"]))
        results.append(row)
        flag = "ok  " if row["ok"] else "FAIL"
        note = ""
        if not row["shared_fits"]:
            note = " (over the limit; pruned)" if row["pruned"] else " (over the limit, NOT pruned)"
        if row["byte_loads"] > MAX_BYTE_LOADS:
            note += " (byte loads; pruned for INT4 with zero points)" if row["pruned_for_byte_loads"] else " (byte loads)"
        log(f"{flag}  sm_{arch} {label}: {shared} B shared{note}, {row['byte_loads']} byte loads"
            f"{'' if row['instructions_ok'] else ' (expected instructions missing: ' + pattern + ')'}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS))
    p.add_argument("--all", action="store_true", help="every autotuning config, not one per path")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: the interpreter replaces the kernels, there is nothing to compile")
    results = [r for arch in args.arch for r in compile_all(arch, args.all)]
    bad = [r for r in results if not r["ok"]]
    print(f"{len(results) - len(bad)}/{len(results)} kernel variants compiled with the expected instructions")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
