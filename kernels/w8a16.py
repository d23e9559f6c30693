"""W8A16: fp16 / bf16 (or fp32) activations x INT8 per-channel weights, dequantized in registers.

Contract (the ``cuda`` implementation of ``qruntime.ops.registry.w8a16_linear``)::

    y [M, N] = x [M, K] @ (qweight int8 [N, K] * scales float32 [N]).T + bias [N]     y: x.dtype

The K loop multiplies the int8 codes, converted exactly to x's dtype, on Tensor Cores with fp32
accumulation; the per-channel scale (and the bias) is applied once, in the epilogue.

Paths (chosen by :mod:`qruntime.kernels.dispatch`):
* ``splitk``: 16-row tiles with K split over ``SPLIT_K`` programs whose fp32 partial sums are added
  atomically: enough programs to fill the GPU at decode sizes (M = 1..64), where the weight bytes
  dominate;
* ``gemm``: tiled GEMM with grouped tile order (L2 reuse of weight tiles) for larger M;
* ``dequant``: the weights expanded once to x's dtype by :func:`dequantize`, then cuBLAS, for the very
  large M where the GEMM is compute-bound and the expansion is a few percent.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qruntime.ops.registry import check_int8

from . import dispatch
from ._common import (
    config, dot_mode, grid, launch_out, m_bucket, mma, pruner, splitk_configs, store_tile, tile_offsets,
    to_dtype, tuned,
)

# ---- configs -----------------------------------------------------------------------------------------

SPLITK_CONFIGS = splitk_configs(((32, 128, 2), (64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 64, 4)))
GEMM_CONFIGS = [
    config(128, 256, 64, warps=8, stages=3),
    config(64, 256, 32, warps=4, stages=4),
    config(128, 128, 32, warps=4, stages=4),
    config(128, 128, 64, warps=8, stages=3),
    config(128, 64, 32, warps=4, stages=4),
    config(64, 128, 32, warps=4, stages=4),
    config(64, 128, 64, warps=4, stages=4),
    config(64, 64, 64, warps=4, stages=4),
    config(32, 128, 64, warps=4, stages=4),
    config(32, 64, 64, warps=4, stages=5),
]
# Under TRITON_INTERPRET: large tiles (few programs) and SPLIT_K=2, so the atomic path is exercised;
# the last split-K config serves K below two tiles.
INTERPRET_SPLITK = [config(16, 128, 128, 2), config(16, 128, 64, 2), config(16, 128, 32, 2), config(16, 128, 32)]
INTERPRET_GEMM = [config(32, 128, 128), config(32, 128, 64), config(32, 128, 32)]


_prune = pruner("w8a16")


# ---- kernels -----------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M", "m_bucket"])  # one compile for every M
def _w8a16_kernel(
    # pointers
    x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr,
    # sizes (m_bucket: M's autotuning key, unused in the body)
    M, N, K, m_bucket,
    # strides, in elements
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = (x @ qweight.T) * scales (+ bias). SPLIT_K > 1: out is float32 and zeroed, and each
    of the SPLIT_K programs of a tile adds its partial sum atomically (the bias once, by split 0)."""
    offs_m, offs_n, offs_k, mask_m, mask_n, pid_k = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None] * stride_wk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = mma(acc, a, q.to(tl.float32).to(a.dtype), DOT)  # exact: |q| <= 127

    acc = acc * tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_int8_kernel(
    q_ptr, scales_ptr, out_ptr,
    N, K,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[N, K] = (qweight * scales[:, None]) in float32, rounded once to out's dtype (the reference's
    dequantize_int8(...).to(dtype), bit for bit)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    idx = offs_n[:, None] * K + offs_k[None, :]
    q = tl.load(q_ptr + idx, mask=mask, other=0).to(tl.float32)
    s = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0)
    tl.store(out_ptr + idx, to_dtype(q * s[:, None], out_ptr.dtype.element_ty), mask=mask)


_KEY = ["m_bucket", "N", "K"]
_splitk = tuned(_w8a16_kernel, SPLITK_CONFIGS, INTERPRET_SPLITK, key=_KEY, prune=_prune, reset_to_zero=["out_ptr"])
_gemm = tuned(_w8a16_kernel, GEMM_CONFIGS, INTERPRET_GEMM, key=_KEY, prune=_prune)


# ---- launchers ---------------------------------------------------------------------------------------

def dequantize(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K], float32 [N] -> ``dtype`` [N, K] on qweight's device."""
    n, k = qweight.shape
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    grid = (triton.cdiv(n, 64), triton.cdiv(k, 128))
    _dequant_int8_kernel[grid](qweight.contiguous(), scales, out, n, k, BLOCK_N=64, BLOCK_K=128)
    return out


def _gemm_path(x, qweight, scales, bias, path):
    m, k = x.shape
    n = qweight.shape[0]
    if path == "dequant":
        w = dequantize(qweight, scales, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    split = path == "splitk"
    out = launch_out(x, n, split)
    qweight = qweight.contiguous()
    (_splitk if split else _gemm)[grid(m, n)](
        x, qweight, scales, scales if bias is None else bias, out,
        m, n, k, m_bucket(m),
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, DOT=dot_mode(x.dtype),
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def w8a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                 *, path: str | None = None) -> torch.Tensor:
    """y = x @ (qweight * scales[:, None]).T + bias, on the GPU (or CPU tensors under TRITON_INTERPRET).

    Args:
        x: float16 / bfloat16 / float32 [M, K] (any strides). qweight: int8 [N, K]. scales: float32 [N].
        bias: [N] or None.
        path: ``"splitk"``, ``"gemm"`` or ``"dequant"``; None lets :mod:`dispatch` choose by M.
    Returns:
        [M, N] in x's dtype.
    """
    check_int8(x, qweight, scales, bias)
    dispatch.check_devices("w8a16_linear", x, qweight=qweight, scales=scales, bias=bias)
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[0]))
    path = dispatch.resolve("w8a16", (tuple(qweight.shape), x.dtype), x, path,
                            lambda p: _gemm_path(x, qweight, scales, bias, p))
    return _gemm_path(x, qweight, scales, bias, path)
