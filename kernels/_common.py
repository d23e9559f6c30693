"""What the Triton kernel files share: interpreter detection, M buckets, autotuning with pruned configs.

Nothing here touches CUDA at import: device properties are read on the first tuned launch and cached.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Iterable

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run in NumPy on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def m_bucket(m: int) -> int:
    """The autotuning bucket of M: the next power of two, capped at 4096 (beyond it the best config
    no longer changes), so a decode step (M = 1..16) and a long prefill get their own configs without
    re-tuning every distinct M."""
    return min(4096, 1 << max(0, (m - 1).bit_length()))


# fp16/bf16 activations: native tensor-core dot. fp32 activations: an exact fp32 dot (Triton's default
# for fp32 would be TF32, 10-bit mantissa), and bf16 under the interpreter too: Triton 3.x's interpreter
# computes tl.dot on bf16 operands wrongly, and upcasting first is exact (bf16 products fit in fp32).
DOT_NATIVE, DOT_FP32 = 0, 1


def dot_mode(dtype: torch.dtype) -> int:
    if dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting()):
        return DOT_FP32
    return DOT_NATIVE


# The interpreter casts float32 -> bfloat16 by truncation; the GPU rounds to nearest even. Kernels
# cast through to_dtype so that both round alike (and the tests compare bits, not just tolerances).
_EMULATE_RTNE = tl.constexpr(interpreting())


@triton.jit
def to_dtype(v, dtype: tl.constexpr):
    """float32 ``v`` rounded to ``dtype`` to nearest even (on the GPU: a plain cast)."""
    if _EMULATE_RTNE:
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, in groups of GROUP_M row-tiles so that consecutive programs
    share weight tiles in L2 (the ordering of the Triton matmul tutorial)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_pid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return pid_m, pid_n


@triton.jit
def tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """The shared prologue of the GEMM kernels: (offs_m, offs_n, offs_k, mask_m, mask_n, pid_k) of this
    program's output tile (grouped order, see tile_ids) and K split."""
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, tl.arange(0, BLOCK_K), offs_m < M, offs_n < N, tl.program_id(1)


@triton.jit
def mma(acc, a, b, DOT: tl.constexpr):
    """acc += a @ b with fp32 accumulation (see DOT_NATIVE / DOT_FP32)."""
    if DOT == 1:
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@functools.lru_cache(maxsize=None)
def shared_memory_bytes(device_index: int) -> int:
    """Shared memory a block may use on this GPU (read once, on the first tuned launch)."""
    props = torch.cuda.get_device_properties(device_index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024)


@triton.jit
def store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, pid_k,
               HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The shared epilogue: + bias (once, by split 0), then store in out's dtype; with SPLIT_K > 1 the
    fp32 partial sum is added atomically into the zeroed float32 ``out``."""
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, to_dtype(acc, out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def config(bm: int, bn: int, bk: int, split_k: int = 1, *, warps: int = 4, stages: int = 3) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split_k, "GROUP_M": 8},
        num_warps=warps,
        num_stages=stages,
    )


def splitk_configs(tiles) -> list[triton.Config]:
    """16-row split-K configs: every (BLOCK_N, BLOCK_K, warps) tile with SPLIT_K in 1, 2, 4, 8."""
    return [config(16, bn, bk, sk, warps=w, stages=4) for bn, bk, w in tiles for sk in (1, 2, 4, 8)]


def pruner(kind: str, *, x_arg: str = "x_ptr", x_bytes: int | None = None, min_block_k: int = 16):
    """The ``early_config_prune`` of a kernel: :func:`fits` per launch, plus row tiles no larger than
    the M bucket needs. W4A16 passes its group size (when there are several groups) as the constraint."""

    def prune(configs, named, **launch_kwargs):
        named = {**named, **launch_kwargs}
        x = named[x_arg]
        limit, bucket = smem_limit(x), named["m_bucket"]
        group = named.get("group_size") if not named.get("PER_CHANNEL", True) else None
        what = f"{kind} M={named['M']} N={named['N']} K={named['K']}" + (
            f" group_size={named['group_size']}" if "group_size" in named else "")
        return keep(
            configs,
            lambda c: c.kwargs["BLOCK_M"] <= max(32, bucket) and fits(
                c, x_bytes=x_bytes or x.element_size(), w_bytes=1, k=named["K"], group_size=group,
                smem_limit=limit, min_block_k=min_block_k),
            what,
        )

    return prune


def launch_out(x: torch.Tensor, n: int, split: bool) -> torch.Tensor:
    """The output of a GEMM launch: x's dtype, or a zeroed float32 buffer for the split-K atomics."""
    m = x.shape[0]
    if split:
        return torch.zeros((m, n), device=x.device, dtype=torch.float32)
    return torch.empty((m, n), device=x.device, dtype=x.dtype)


def grid(m: int, n: int):
    """(row tiles x column tiles, K splits) for a launch's meta-parameters."""
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])


def fits(cfg: triton.Config, *, x_bytes: int, w_bytes: float, k: int, group_size: int | None,
         smem_limit: int | None, min_block_k: int = 16) -> bool:
    """The constraints a config must meet for one launch.

    * BLOCK_K divides the quantization group (one scale row per K tile) when there are several groups;
    * BLOCK_K >= min_block_k (16 for fp16/bf16 dots, 32 for int8 Tensor Core dots);
    * SPLIT_K leaves every split at least one K tile;
    * the pipelined tiles fit in shared memory (stages x (activation tile + weight tile)).
    """
    kw = cfg.kwargs
    bm, bn, bk, split_k = kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"]
    if bk < min_block_k:
        return False
    if group_size is not None and group_size % bk:
        return False
    if split_k > 1 and triton.cdiv(k, bk) < split_k:
        return False
    if smem_limit is not None and cfg.num_stages * (bm * bk * x_bytes + bk * bn * w_bytes) > smem_limit:
        return False
    return True


def smem_limit(t: torch.Tensor) -> int | None:
    """The shared memory limit of t's GPU (None for CPU tensors under the interpreter)."""
    return shared_memory_bytes(t.device.index) if t.device.type == "cuda" else None


def tuned(kernel, configs: list[triton.Config], interpret_configs: list[triton.Config], *, key: list[str],
          prune: Callable, reset_to_zero: list[str] | None = None):
    """``kernel`` autotuned over ``configs`` (pruned per launch by ``prune``, keyed on ``key`` plus the
    tensors' dtypes), or, under the interpreter, a launcher that runs the first of ``interpret_configs``
    that ``prune`` keeps: no autotuning there (timing NumPy is meaningless and slow), and tiles chosen to
    keep the program count, hence the test time, small."""
    if interpreting():
        return _FirstConfig(kernel, interpret_configs, prune)
    return triton.autotune(
        configs=configs, key=key, prune_configs_by={"early_config_prune": prune}, reset_to_zero=reset_to_zero,
        do_bench=_tuning_bench,
    )(kernel)


def _tuning_bench(fn, quantiles):
    # shorter than do_bench's defaults (25 ms warm-up, 100 ms of repetitions) per config: the configs
    # differ by far more than the noise of 20 ms, and a model has dozens of (shape, M bucket) keys
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


class _FirstConfig:
    def __init__(self, kernel, configs, prune):
        self.kernel, self.configs, self.prune = kernel, configs, prune

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.kernel.arg_names, args), **kwargs)
            cfg = self.prune(self.configs, named)[0]
            g = grid(named | cfg.kwargs) if callable(grid) else grid
            return self.kernel[g](*args, **kwargs, **cfg.kwargs)

        return launch


def keep(configs: Iterable[triton.Config], ok: Callable[[triton.Config], bool], what: str) -> list[triton.Config]:
    """The configs that pass ``ok``; an autotuner needs at least one, so none is an error naming the launch."""
    kept = [c for c in configs if ok(c)]
    if not kept:
        raise ValueError(f"{what}: no kernel configuration meets the constraints (kernels/_common.fits)")
    return kept
