"""W8A8: dynamic per-token INT8 activations x INT8 per-channel weights on int8 Tensor Cores.

Contract (the ``cuda`` implementation of ``qruntime.ops.registry.w8a8_linear``; definition in docs/formats.md)::

    xq, a = quantize_per_token(x)                  # one fused kernel: row absmax -> scale and int8 codes
    y[m, n] = a[m] * scales[n] * sum_k xq[m, k] * qweight[n, k] + bias[n]      (int32 accumulation)

:func:`quantize_per_token` produces bit-identical codes and scales to
``qruntime.ops.reference.quantize_per_token`` (IEEE division, round half to even). The GEMM multiplies int8
tiles with int32 accumulators and applies both scales and the bias in the epilogue, writing x's dtype.
Paths ``splitk`` and ``gemm`` as in :mod:`qruntime.kernels.w8a16` (no ``dequant`` path: the activations
are quantized too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from qruntime.ops.registry import check_int8

from . import dispatch
from ._common import (
    config, grid, interpreting, launch_out, m_bucket, pruner, splitk_configs, store_tile, tile_offsets, tuned,
)

# ---- configs -----------------------------------------------------------------------------------------

SPLITK_CONFIGS = splitk_configs(((64, 128, 4), (64, 256, 4), (128, 128, 4), (128, 256, 8), (32, 128, 2)))
GEMM_CONFIGS = [
    config(128, 256, 128, warps=8, stages=3),
    config(256, 128, 128, warps=8, stages=3),
    config(128, 128, 128, warps=8, stages=3),
    config(128, 128, 64, warps=4, stages=4),
    config(128, 256, 64, warps=8, stages=4),
    config(64, 128, 128, warps=4, stages=4),
    config(64, 256, 128, warps=8, stages=3),
    config(64, 64, 128, warps=4, stages=4),
    config(32, 128, 128, warps=4, stages=4),
    config(32, 64, 64, warps=4, stages=5),
]
# Under TRITON_INTERPRET: large tiles (few programs) and SPLIT_K=2, so the atomic path is exercised;
# the last split-K config serves K below two tiles.
INTERPRET_SPLITK = [config(16, 128, 128, 2), config(16, 128, 64, 2), config(16, 128, 32, 2), config(16, 128, 32)]
INTERPRET_GEMM = [config(32, 128, 128), config(32, 128, 64)]
QUANT_BLOCK_K = 1024


_prune = pruner("w8a8", x_arg="xq_ptr", x_bytes=1, min_block_k=32)


# ---- kernels -----------------------------------------------------------------------------------------

@triton.jit
def _quantize_per_token_kernel(
    # pointers
    x_ptr, xq_ptr, a_ptr,
    # sizes and strides
    K, stride_xm, stride_xk, stride_qm,
    # meta-parameters
    BLOCK_K: tl.constexpr, USE_RINT: tl.constexpr,
):
    """Row m: a[m] = max|x[m, :]| / 127; xq[m, :] = clamp(rint(x * (127 / max)), -127, 127)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    bad = tl.zeros((BLOCK_K,), dtype=tl.int32)  # NaN / Inf seen (max would drop a NaN)
    for k0 in range(0, K, BLOCK_K):
        v = tl.load(x_ptr + row * stride_xm + (k0 + offs) * stride_xk, mask=k0 + offs < K, other=0.0)
        v = tl.abs(v.to(tl.float32))
        bad = tl.maximum(bad, tl.where(v <= 3.4028234663852886e38, 0, 1))
        amax = tl.maximum(amax, v)
    row_max = tl.max(amax, axis=0)
    finite = tl.max(bad, axis=0) == 0
    c127 = tl.full((), 127.0, tl.float32)
    inv = tl.where((row_max > 0) & finite, tl.math.div_rn(c127, tl.where(row_max > 0, row_max, 1.0)), 0.0)
    # a row holding a NaN / Inf: scale NaN and codes 0, so its outputs are NaN (the reference's rule)
    tl.store(a_ptr + row, tl.where(finite, tl.math.div_rn(row_max, c127), float("nan")))
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + offs < K
        v = tl.load(x_ptr + row * stride_xm + (k0 + offs) * stride_xk, mask=mask, other=0.0).to(tl.float32)
        t = tl.where(finite, v, 0.0) * inv
        if USE_RINT:
            r = libdevice.rint(t)
        else:
            # round half to even via the fp32 rounding of an add (|t| <= 127 << 2^22); the interpreter
            # runs NumPy, which neither fuses nor reassociates, and has no libdevice
            r = (t + 12582912.0) - 12582912.0
        r = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(xq_ptr + row * stride_qm + k0 + offs, r.to(tl.int8), mask=mask)


@triton.jit(do_not_specialize=["M", "m_bucket"])  # one compile for every M
def _w8a8_kernel(
    # pointers
    xq_ptr, w_ptr, a_ptr, scales_ptr, bias_ptr, out_ptr,
    # sizes (m_bucket: M's autotuning key, unused in the body)
    M, N, K, m_bucket,
    # strides, in elements
    stride_xm, stride_wn, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out = a[:, None] * scales[None, :] * (xq @ qweight.T) (+ bias); int32 accumulation. SPLIT_K > 1:
    out is float32 and zeroed, scaled partial sums are added atomically (the bias once, by split 0)."""
    offs_m, offs_n, offs_k, mask_m, mask_n, pid_k = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(xq_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
        b = tl.load(w_ptr + offs_n[None, :] * stride_wn + k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)

    a_scale = tl.load(a_ptr + offs_m, mask=mask_m, other=0.0)
    w_scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * w_scale[None, :]
    store_tile(y, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, pid_k, HAS_BIAS, SPLIT_K)


if interpreting():
    libdevice = None  # never reached: USE_RINT is False under the interpreter
else:
    from triton.language.extra import libdevice

_KEY = ["m_bucket", "N", "K"]
_splitk = tuned(_w8a8_kernel, SPLITK_CONFIGS, INTERPRET_SPLITK, key=_KEY, prune=_prune, reset_to_zero=["out_ptr"])
_gemm = tuned(_w8a8_kernel, GEMM_CONFIGS, INTERPRET_GEMM, key=_KEY, prune=_prune)


# ---- launchers ---------------------------------------------------------------------------------------

def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x float [M, K] -> (xq int8 [M, K], a float32 [M]), bit-identical to the reference."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: dtype {x.dtype}, shape {tuple(x.shape)}; expected a float [M, K] tensor")
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8, device=x.device)
    a = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m:
        block_k = min(QUANT_BLOCK_K, triton.next_power_of_2(max(k, 16)))
        _quantize_per_token_kernel[(m,)](
            x, xq, a, k, x.stride(0), x.stride(1), xq.stride(0), BLOCK_K=block_k, USE_RINT=not interpreting()
        )
    return xq, a


def _gemm_path(x, qweight, scales, bias, path):
    m, k = x.shape
    n = qweight.shape[0]
    xq, a = quantize_per_token(x)
    split = path == "splitk"
    out = launch_out(x, n, split)
    qweight = qweight.contiguous()
    (_splitk if split else _gemm)[grid(m, n)](
        xq, qweight, a, scales, scales if bias is None else bias, out,
        m, n, k, m_bucket(m),
        xq.stride(0), qweight.stride(0), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None,
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def w8a8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None,
                *, path: str | None = None) -> torch.Tensor:
    """Dynamic per-token INT8 x INT8 per-channel GEMM on the GPU (or CPU tensors under TRITON_INTERPRET).

    Args:
        x: float16 / bfloat16 / float32 [M, K]. qweight: int8 [N, K]. scales: float32 [N]. bias: [N] or None.
        path: ``"splitk"`` or ``"gemm"``; None lets :mod:`dispatch` choose by M.
    Returns:
        [M, N] in x's dtype.
    """
    check_int8(x, qweight, scales, bias)
    dispatch.check_devices("w8a8_linear", x, qweight=qweight, scales=scales, bias=bias)
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[0]))
    path = dispatch.resolve("w8a8", (tuple(qweight.shape), x.dtype), x, path,
                            lambda p: _gemm_path(x, qweight, scales, bias, p))
    return _gemm_path(x, qweight, scales, bias, path)
