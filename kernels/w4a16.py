"""W4A16: fp16 / bf16 (or fp32) activations x INT4 weights (per-channel or group-wise, symmetric or
asymmetric), dequantized in registers inside the K loop.

Contract (the ``cuda`` implementation of ``qruntime.ops.registry.w4a16_linear``; format in docs/formats.md)::

    y [M, N] = x [M, K] @ W.T + bias,   W[n, k] = (code(n, k) - zero[k // group_size, n]) * scales[k // group_size, n]
    qweight uint8 [N, Kp / 2] (column k in byte k // 2, low nibble for even k), scales float32 [G, N],
    zeros uint8 [G, N] or None (symmetric: zero point 8), Kp = G * group_size >= K.

The packed bytes of a tile are loaded as [BLOCK_N, BLOCK_K / 2] (contiguous along K: vector loads of
whole bytes) and the nibbles interleaved in registers into [BLOCK_N, BLOCK_K] codes, fed to the dot
transposed. Group-wise (G > 1): each K tile lies inside one group (the configs are pruned to BLOCK_K
dividing the group size), so a tile loads one row of scales / zero points; the codes are dequantized to x's dtype in
float32 math (the reference's rounding, bit for bit) and multiplied on Tensor Cores with fp32
accumulation. Per-channel (G == 1): the tile multiplies ``code - zero`` (small integers, exact in
fp16/bf16) and the scale is applied once in the epilogue. The padded columns K..Kp are never read.

Paths as in :mod:`qruntime.kernels.w8a16` (``splitk``, ``gemm``, ``dequant``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qruntime.ops.registry import check_w4a16

from . import dispatch
from ._common import (
    config, dot_mode, grid, launch_out, m_bucket, mma, pruner, splitk_configs, store_tile, tile_offsets,
    to_dtype, tuned,
)

# ---- configs -----------------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_K, warps) of the 16-row split-K tiles; BLOCK_K down to 16 for group_size=16
SPLITK_TILES = ((32, 128, 2), (64, 128, 4), (64, 64, 4), (128, 128, 4), (128, 64, 4), (64, 32, 2), (64, 16, 2))
SPLITK_CONFIGS = splitk_configs(SPLITK_TILES)
GEMM_CONFIGS = [
    config(128, 256, 64, warps=8, stages=3),
    config(128, 128, 64, warps=8, stages=3),
    config(128, 128, 32, warps=4, stages=4),
    config(64, 256, 32, warps=4, stages=4),
    config(64, 128, 64, warps=4, stages=4),
    config(64, 128, 32, warps=4, stages=4),
    config(64, 64, 64, warps=4, stages=4),
    config(32, 128, 64, warps=4, stages=4),
    config(32, 64, 32, warps=4, stages=5),
    config(64, 64, 16, warps=4, stages=4),
    config(32, 64, 16, warps=4, stages=4),
]
# Under TRITON_INTERPRET: large tiles (few programs) and SPLIT_K=2, so the atomic path is exercised;
# the last split-K config serves K below two tiles.
INTERPRET_SPLITK = [config(16, 128, 64, 2), config(16, 128, 32, 2), config(16, 128, 16, 2), config(16, 128, 16)]
INTERPRET_GEMM = [config(32, 128, 64), config(32, 128, 32), config(32, 128, 16)]


_prune = pruner("w4a16")


# ---- kernels -----------------------------------------------------------------------------------------

@triton.jit(do_not_specialize=["M", "m_bucket"])  # one compile for every M
def _w4a16_kernel(
    # pointers
    x_ptr, w_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    # sizes (m_bucket: M's autotuning key, unused in the body; K_packed = Kp / 2, bytes per weight row)
    M, N, K, K_packed, m_bucket, group_size,
    # strides, in elements (qweight's K stride is 1: one byte holds columns 2j and 2j+1)
    stride_xm, stride_xk, stride_wn, stride_om, stride_on,
    # meta-parameters
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr, DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = x @ dequant(qweight).T (+ bias). SPLIT_K > 1: out is float32 and zeroed, partial
    sums are added atomically (the bias once, by split 0)."""
    offs_m, offs_n, offs_k, mask_m, mask_n, pid_k = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    zero = tl.full((BLOCK_N,), 8.0, tl.float32)  # symmetric codes are q + 8
    if PER_CHANNEL:
        scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)

    offs_byte = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        # [BLOCK_N, BLOCK_K / 2] bytes, contiguous along K (vector loads); byte j holds columns 2j, 2j+1.
        # Masked by the row length only: codes of columns K..Kp dequantize to 0 and meet x = 0 anyway.
        byte = k0 // 2 + offs_byte
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte[None, :],
                         mask=mask_n[:, None] & (byte < K_packed)[None, :], other=0).to(tl.int32)
        code = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # [BLOCK_N, BLOCK_K], k = 2j: low
        if PER_CHANNEL:
            w = (code - zero[:, None]).to(a.dtype)  # integers in [-15, 15]: exact
        else:
            g = k0 // group_size  # the whole tile is in group g (BLOCK_K divides group_size)
            scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            w = to_dtype((code - zero[:, None]) * scale[:, None], a.dtype)
        acc = mma(acc, a, tl.trans(w), DOT)

    if PER_CHANNEL:
        acc = acc * scale[None, :]
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_int4_kernel(
    w_ptr, scales_ptr, zeros_ptr, out_ptr,
    N, K, K_packed, group_size, stride_wn,
    HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[N, K] = (code - zero) * scale in float32, rounded once to out's dtype (the reference's
    dequantize_int4(...).to(dtype), bit for bit)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte[None, :],
                     mask=(offs_n[:, None] < N) & (byte < K_packed)[None, :], other=0).to(tl.int32)
    code = tl.interleave(packed & 0xF, packed >> 4).to(tl.float32)  # [BLOCK_N, BLOCK_K]
    gidx = (offs_k // group_size)[None, :] * N + offs_n[:, None]
    scale = tl.load(scales_ptr + gidx, mask=mask, other=0.0)
    if HAS_ZEROS:
        zero = tl.load(zeros_ptr + gidx, mask=mask, other=0).to(tl.float32)
    else:
        zero = 8.0
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], to_dtype((code - zero) * scale, out_ptr.dtype.element_ty),
             mask=mask)


_KEY = ["m_bucket", "N", "K", "group_size"]
_splitk = tuned(_w4a16_kernel, SPLITK_CONFIGS, INTERPRET_SPLITK, key=_KEY, prune=_prune, reset_to_zero=["out_ptr"])
_gemm = tuned(_w4a16_kernel, GEMM_CONFIGS, INTERPRET_GEMM, key=_KEY, prune=_prune)


# ---- launchers ---------------------------------------------------------------------------------------

def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int,
               in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [N, Kp/2] codes + scales/zeros [G, N] -> ``dtype`` [N, in_features] on qweight's device."""
    n = qweight.shape[0]
    out = torch.empty((n, in_features), dtype=dtype, device=qweight.device)
    qweight = qweight.contiguous()
    grid = (triton.cdiv(n, 64), triton.cdiv(in_features, 128))
    _dequant_int4_kernel[grid](
        qweight, scales.contiguous(), scales if zeros is None else zeros.contiguous(), out,
        n, in_features, qweight.shape[1], group_size, qweight.stride(0),
        HAS_ZEROS=zeros is not None, BLOCK_N=64, BLOCK_K=128,
    )
    return out


def _gemm_path(x, qweight, scales, zeros, group_size, bias, path):
    m, k = x.shape
    n = qweight.shape[0]
    if path == "dequant":
        w = dequantize(qweight, scales, zeros, group_size, k, x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))
    split = path == "splitk"
    out = launch_out(x, n, split)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = None if zeros is None else zeros.contiguous()
    (_splitk if split else _gemm)[grid(m, n)](
        x, qweight, scales, scales if zeros is None else zeros, scales if bias is None else bias, out,
        m, n, k, qweight.shape[1], m_bucket(m), group_size,
        x.stride(0), x.stride(1), qweight.stride(0), out.stride(0), out.stride(1),
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, PER_CHANNEL=scales.shape[0] == 1,
        DOT=dot_mode(x.dtype),
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 group_size: int, bias: torch.Tensor | None, *, path: str | None = None) -> torch.Tensor:
    """y = x @ dequant_int4(qweight, scales, zeros, group_size).T + bias, on the GPU (or CPU tensors
    under TRITON_INTERPRET).

    Args:
        x: float16 / bfloat16 / float32 [M, K] (any strides), K <= Kp. qweight: uint8 [N, Kp / 2].
        scales: float32 [Kp / group_size, N]. zeros: uint8 [Kp / group_size, N] or None (symmetric).
        group_size: columns per group (Kp for per-channel). bias: [N] or None.
        path: ``"splitk"``, ``"gemm"`` or ``"dequant"``; None lets :mod:`dispatch` choose by M.
    Returns:
        [M, N] in x's dtype.
    """
    check_w4a16(x, qweight, scales, zeros, group_size, bias)
    dispatch.check_devices("w4a16_linear", x, qweight=qweight, scales=scales, zeros=zeros, bias=bias)
    if x.shape[0] == 0:
        return x.new_empty((0, qweight.shape[0]))
    key = (tuple(qweight.shape), group_size, zeros is None, x.dtype)
    path = dispatch.resolve("w4a16", key, x, path,
                            lambda p: _gemm_path(x, qweight, scales, zeros, group_size, bias, p))
    return _gemm_path(x, qweight, scales, zeros, group_size, bias, path)
