"""2:4 sparse: fp16 / bf16 (or fp32) activations x 2:4-sparse weights whose kept values are float, INT8
codes (per-row scales) or INT4 codes (group scales / zero points), expanded in registers inside the K loop.

Contract (the ``cuda`` implementation of ``qruntime.ops.registry.sp24_linear``; format in docs/formats.md,
"2:4 sparse")::

    y [M, N] = x [M, K] @ W.T + bias,   W[n, 4 * (c // 2) + p(n, c)] = value(n, c), every other entry 0
    p(n, c) = (meta[n, c // 4] >> (2 * (c % 4))) & 3           meta uint8 [N, Kp / 8], Kp >= K, Kp % 8 == 0
    values: float [N, Kp / 2]                        value = values[n, c]
            int8  [N, Kp / 2], scales float32 [N]    value = q(n, c) * scales[n]
            uint8 [N, Kp / 4] (two INT4 codes a byte, kept value c in byte c // 2, low nibble for even c),
                  scales float32 [Kp / g, N], zeros uint8 [Kp / g, N] or None (symmetric: zero point 8)
                                                     value = (code(n, c) - zero[j, n]) * scales[j, n], j = k // g

Expansion in registers. A K tile of BLOCK_K dense columns [k0, k0 + BLOCK_K) (k0 a multiple of BLOCK_K,
itself a multiple of 8) holds the BLOCK_K / 4 groups of four columns k0 / 4 + j; the kept values of group j
are c = k0 / 2 + 2 j (``v0``) and c + 1 (``v1``), their positions are in meta byte k0 / 8 + j // 2 (bits 0-3
for even j, 4-7 for odd j). The kernel loads, contiguous along K, the values [BLOCK_N, BLOCK_K / 2]
(INT4: [BLOCK_N, BLOCK_K / 4] bytes, byte j = group j, low nibble ``v0``) and the meta bytes
[BLOCK_N, BLOCK_K / 8], splits them into the pairs ``(v0, v1)`` and positions ``(p0, p1)``, each
[BLOCK_N, BLOCK_K / 4], dequantizes the kept values to x's dtype (half the work of dequantizing the dense
tile), builds column q = 0..3 of every group as ``where(p0 == q, v0, where(p1 == q, v1, 0))`` in one
[BLOCK_N, BLOCK_K / 4, 4] select, reshaped (row-major) into the dense [BLOCK_N, BLOCK_K] tile, fed
transposed to ``tl.dot`` with fp32 accumulation.

Dequantization: float values are rounded to x's dtype (a no-op when the dtypes agree); INT8 codes are
exact in fp16/bf16 and the per-row scale is applied in the epilogue; INT4 group-wise: ``(code - zero) *
scale`` in float32 rounded to x's dtype (the reference's rounding), one scale row per tile (BLOCK_K
divides the group size); INT4 with one group (per-channel): ``code - zero`` (exact) in the dot and the
scale in the epilogue. Columns K..Kp meet x = 0 (masked); bytes past Kp are never read.

Paths (chosen by :mod:`qruntime.kernels.dispatch`, kind ``"sp24"``):
* ``splitk`` / ``gemm``: the kernel above, as in :mod:`qruntime.kernels.w8a16`;
* ``dequant``: the weight expanded once to a dense [N, K] tensor in x's dtype by :func:`dequantize`
  (bit-identical to the reference's), then cuBLAS ``F.linear``;
* ``sparse``: PyTorch's semi-structured sparse tensor (cuSPARSELt, else CUTLASS: the Sparse Tensor Cores)
  built once from the same dense expansion and cached beside ``values`` (:func:`semi_structured`).
  Only on CUDA with compute capability >= 8.0, fp16 / bf16 activations, N a multiple of 32 and K of 64;
  never under the interpreter. Where it is unavailable it is not a candidate, and a forced ``sparse``
  runs ``dequant`` (same result, one warning).
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qruntime.ops import registry as ops
from qruntime.ops.registry import check_sp24, sp24_kind

from . import dispatch
from ._common import (
    config, dot_mode, grid, interpreting, launch_out, m_bucket, mma, pruner, splitk_configs, store_tile,
    tile_offsets, to_dtype, tuned,
)

# ---- configs -----------------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_K, warps) of the 16-row split-K tiles; BLOCK_K down to 16 for INT4 group_size=16
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

# the kept-value format, a constexpr of the kernels
FLOAT, INT8, INT4 = 0, 1, 2
_KIND_CODE = {"float": FLOAT, "int8": INT8, "int4": INT4}
_INT4 = tl.constexpr(INT4)
_INT8 = tl.constexpr(INT8)
_FLOAT = tl.constexpr(FLOAT)

_fits = pruner("sp24")

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of GEMM_CONFIGS that, with grouped INT4 values and zero points,
# load the tile's zero points a byte per row per thread inside the K loop (32 one-byte loads a tile
# instead of one or two: Triton 3.9 gives that uint8 load the expansion's 3-D layout; all three have
# BLOCK_N below the thread count, though not every such config does). Found by
# ``python -m qruntime.kernels.aot --all`` for sm_90; dropped for those launches only.
INT4_ZERO_BYTE_LOADS = frozenset({(128, 128, 64, 8), (64, 64, 64, 4), (32, 64, 32, 4)})


def drops_for_int4_zeros(cfg: triton.Config) -> bool:
    kw = cfg.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], cfg.num_warps) in INT4_ZERO_BYTE_LOADS


def _prune(configs, named, **launch_kwargs):
    """The shared constraints (``kernels._common.fits``), then, for grouped INT4 values with zero points,
    without the configs of :data:`INT4_ZERO_BYTE_LOADS`."""
    kept = _fits(configs, named, **launch_kwargs)
    args = {**named, **launch_kwargs}
    if args.get("VALUES") == INT4 and args.get("HAS_ZEROS") and not args.get("PER_CHANNEL"):
        kept = [c for c in kept if not drops_for_int4_zeros(c)] or kept  # never leave the tuner nothing
    return kept


# ---- kernels -----------------------------------------------------------------------------------------

@triton.jit
def _kept_pairs(values_ptr, offs_n, mask_n, k0, stride_vn, Kp,
                VALUES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The kept values (v0, v1) of the BLOCK_K / 4 groups of the K tile at dense column k0, each
    [BLOCK_N, BLOCK_K / 4]: the stored elements (float or int8), or INT4 codes as float32."""
    if VALUES == _INT4:
        # byte c // 2 holds kept values c (low nibble) and c + 1: byte j of the tile is group j
        byte = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        packed = tl.load(values_ptr + offs_n[:, None] * stride_vn + byte[None, :],
                         mask=mask_n[:, None] & (byte < Kp // 4)[None, :], other=0).to(tl.int32)
        v0 = (packed & 0xF).to(tl.float32)
        v1 = (packed >> 4).to(tl.float32)
    else:
        c = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        v = tl.load(values_ptr + offs_n[:, None] * stride_vn + c[None, :],
                    mask=mask_n[:, None] & (c < Kp // 2)[None, :], other=0)
        v0, v1 = tl.split(tl.reshape(v, (BLOCK_N, BLOCK_K // 4, 2)))
    return v0, v1


@triton.jit
def _positions(meta_ptr, offs_n, mask_n, k0, stride_mn, Kp, BLOCK_K: tl.constexpr):
    """The 2-bit positions (p0, p1) of the two kept values of every group of the K tile at k0, each
    [BLOCK_N, BLOCK_K / 4] int32. Meta byte b covers groups 2b (bits 0-1: p0, 2-3: p1) and 2b + 1
    (bits 4-5, 6-7)."""
    byte = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    m = tl.load(meta_ptr + offs_n[:, None] * stride_mn + byte[None, :],
                mask=mask_n[:, None] & (byte < Kp // 8)[None, :], other=0).to(tl.int32)
    p0 = tl.interleave(m & 3, (m >> 4) & 3)
    p1 = tl.interleave((m >> 2) & 3, (m >> 6) & 3)
    return p0, p1


@triton.jit
def expand(v0, v1, p0, p1, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dense [BLOCK_N, BLOCK_K] tile of kept pairs (v0, v1) at positions (p0, p1), all
    [BLOCK_N, BLOCK_K / 4]: column 4 j + q holds v0 if p0 == q, v1 if p1 == q, else 0."""
    q = tl.arange(0, 4)[None, None, :]
    zero = tl.zeros((BLOCK_N, BLOCK_K // 4, 4), v0.dtype)
    w = tl.where(p0[:, :, None] == q, v0[:, :, None], tl.where(p1[:, :, None] == q, v1[:, :, None], zero))
    # row-major: [n, j, q] -> [n, 4 j + q]. (Built as one 3-D select and a reshape: the same expansion
    # written as nested tl.interleave of the four columns fails to compile for sm_90 wgmma with Triton 3.9,
    # "Illegal shared layout" in TritonGPUOptimizeDotOperands.)
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit(do_not_specialize=["M", "m_bucket"])  # one compile for every M
def _sp24_kernel(
    # pointers (scales / zeros: any valid pointer when unused)
    x_ptr, values_ptr, meta_ptr, scales_ptr, zeros_ptr, bias_ptr, out_ptr,
    # sizes (Kp: the padded K of the 2:4 tensors; m_bucket: M's autotuning key, unused in the body)
    M, N, K, Kp, m_bucket, group_size,
    # strides, in elements (values and meta are contiguous along K)
    stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on,
    # meta-parameters (VALUES: FLOAT / INT8 / INT4; PER_CHANNEL: one scale per row, applied after the loop)
    VALUES: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, PER_CHANNEL: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out[M, N] = x @ expand(values, meta).T (+ bias). SPLIT_K > 1: out is float32 and zeroed, partial
    sums are added atomically (the bias once, by split 0)."""
    offs_m, offs_n, offs_k, mask_m, mask_n, pid_k = tile_offsets(M, N, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)

    zero = tl.full((BLOCK_N,), 8.0, tl.float32)  # symmetric INT4 codes are q + 8
    scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    if VALUES != _FLOAT and PER_CHANNEL:
        scale = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)
        if HAS_ZEROS:
            zero = tl.load(zeros_ptr + offs_n, mask=mask_n, other=0).to(tl.float32)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        a = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        p0, p1 = _positions(meta_ptr, offs_n, mask_n, k0, stride_mn, Kp, BLOCK_K)
        v0, v1 = _kept_pairs(values_ptr, offs_n, mask_n, k0, stride_vn, Kp, VALUES, BLOCK_N, BLOCK_K)
        if VALUES == _FLOAT:
            if values_ptr.dtype.element_ty != x_ptr.dtype.element_ty:
                v0 = to_dtype(v0.to(tl.float32), a.dtype)
                v1 = to_dtype(v1.to(tl.float32), a.dtype)
        elif VALUES == _INT8:
            v0 = v0.to(tl.float32).to(a.dtype)  # exact: |q| <= 127
            v1 = v1.to(tl.float32).to(a.dtype)
        elif PER_CHANNEL:
            v0 = (v0 - zero[:, None]).to(a.dtype)  # integers in [-15, 15]: exact
            v1 = (v1 - zero[:, None]).to(a.dtype)
        else:
            g = k0 // group_size  # the whole tile is in group g (BLOCK_K divides group_size)
            scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            if HAS_ZEROS:
                zero = tl.load(zeros_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
            v0 = to_dtype((v0 - zero[:, None]) * scale[:, None], a.dtype)
            v1 = to_dtype((v1 - zero[:, None]) * scale[:, None], a.dtype)
        w = expand(v0, v1, p0, p1, BLOCK_N, BLOCK_K)  # in x's dtype
        acc = mma(acc, a, tl.trans(w), DOT)

    if VALUES != _FLOAT and PER_CHANNEL:
        acc = acc * scale[None, :]
    store_tile(acc, bias_ptr, out_ptr, offs_m, offs_n, mask_m, mask_n, stride_om, stride_on, pid_k, HAS_BIAS, SPLIT_K)


@triton.jit
def _dequant_sp24_kernel(
    values_ptr, meta_ptr, scales_ptr, zeros_ptr, out_ptr,
    N, K, Kp, group_size, stride_vn, stride_mn,
    VALUES: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[N, K] = the dense weight: each kept value dequantized in float32 and rounded once to out's
    dtype (the reference's dequantize_sp24(...).to(dtype), bit for bit), zeros elsewhere."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    p0, p1 = _positions(meta_ptr, offs_n, mask_n, k0, stride_mn, Kp, BLOCK_K)
    v0, v1 = _kept_pairs(values_ptr, offs_n, mask_n, k0, stride_vn, Kp, VALUES, BLOCK_N, BLOCK_K)
    v0 = v0.to(tl.float32)
    v1 = v1.to(tl.float32)
    if VALUES == _INT8:
        s = tl.load(scales_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        v0 = v0 * s
        v1 = v1 * s
    elif VALUES == _INT4:
        # the scale group of every group of four columns (a group of g columns holds whole groups of 4)
        col = k0 + 4 * tl.arange(0, BLOCK_K // 4)
        gidx = (col // group_size)[None, :] * N + offs_n[:, None]
        gmask = mask_n[:, None] & (col < Kp)[None, :]
        s = tl.load(scales_ptr + gidx, mask=gmask, other=0.0)
        if HAS_ZEROS:
            z = tl.load(zeros_ptr + gidx, mask=gmask, other=0).to(tl.float32)
        else:
            z = 8.0
        v0 = (v0 - z) * s
        v1 = (v1 - z) * s
    dtype = out_ptr.dtype.element_ty
    w = expand(to_dtype(v0, dtype), to_dtype(v1, dtype), p0, p1, BLOCK_N, BLOCK_K)
    tl.store(out_ptr + offs_n[:, None] * K + offs_k[None, :], w, mask=mask_n[:, None] & (offs_k < K)[None, :])


_KEY = ["m_bucket", "N", "K", "group_size", "VALUES"]
_splitk = tuned(_sp24_kernel, SPLITK_CONFIGS, INTERPRET_SPLITK, key=_KEY, prune=_prune, reset_to_zero=["out_ptr"])
_gemm = tuned(_sp24_kernel, GEMM_CONFIGS, INTERPRET_GEMM, key=_KEY, prune=_prune)


# ---- the semi-structured (Sparse Tensor Core) path ------------------------------------------------------

SEMI_DTYPES = (torch.float16, torch.bfloat16)
SEMI_N_MULTIPLE, SEMI_K_MULTIPLE = 32, 64  # the larger of cuSPARSELt's and CUTLASS's minimum tile sizes
SEMI_PROBE_TOL = 1e-2  # relative error of the one-off probe product, sparse vs dense (output rounding only)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def semi_structured_supported(x: torch.Tensor, n: int) -> str | None:
    """None when the ``sparse`` path can run for activations ``x`` [M, K] and N = ``n`` output channels,
    else why not (no CUDA query for CPU tensors or under the interpreter)."""
    k = x.shape[1]
    if interpreting() or x.device.type != "cuda":
        return "needs a CUDA device (not the interpreter)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return f"torch {torch.__version__} has no torch.sparse.to_sparse_semi_structured"
    if x.dtype not in SEMI_DTYPES:
        return f"x dtype {x.dtype}: semi-structured sparse tensors need fp16 or bf16"
    if _capability(x.device.index or 0) < (8, 0):
        return f"compute capability {_capability(x.device.index or 0)} < 8.0 (no Sparse Tensor Cores)"
    if n % SEMI_N_MULTIPLE or k % SEMI_K_MULTIPLE:
        return f"N={n}, K={k}: needs N a multiple of {SEMI_N_MULTIPLE} and K of {SEMI_K_MULTIPLE}"
    return None


def _to_semi_structured(dense: torch.Tensor):
    """torch's conversion (cuSPARSELt by default), else CUTLASS; raises the last RuntimeError."""
    try:
        return torch.sparse.to_sparse_semi_structured(dense)
    except (RuntimeError, NotImplementedError):
        cutlass = getattr(torch.sparse, "SparseSemiStructuredTensorCUTLASS", None)
        if cutlass is None:
            raise
        return cutlass.from_dense(dense)


def _build_semi(values, meta, scales, zeros, group_size, in_features, dtype):
    dense = dequantize(values, meta, scales, zeros, group_size, in_features, dtype)
    try:
        sparse = _to_semi_structured(dense)
        # a backend that converts or multiplies wrongly must not be used: one probe product, compared
        # with cuBLAS on the same dense weight
        gen = torch.Generator(device=dense.device).manual_seed(0)
        probe = torch.randn(64, in_features, device=dense.device, dtype=dtype, generator=gen)
        want = F.linear(probe, dense).float()
        err = ((F.linear(probe, sparse).float() - want).norm() / want.norm().clamp_min(1e-30)).item()
    except (RuntimeError, NotImplementedError) as exc:
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        if err <= SEMI_PROBE_TOL:
            return sparse
        reason = f"probe product differs from the dense one by {err:.2e} (relative)"
    warnings.warn(f"qruntime: 2:4 weight {tuple(dense.shape)} {dtype}: semi-structured sparse path unavailable "
                  f"({reason}); its calls run the dense fallback (dequantize + cuBLAS)",
                  RuntimeWarning, stacklevel=4)
    return None


def semi_structured(values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None,
                    zeros: torch.Tensor | None, group_size: int, in_features: int, dtype: torch.dtype):
    """The weight as a ``torch.sparse`` semi-structured tensor [N, in_features] in ``dtype``, or None when
    the conversion or its probe product fails (one warning).

    Built once per weight and dtype from :func:`dequantize`, and cached beside ``values`` (as the CPU
    layouts of :mod:`qruntime.ops.registry`: rebuilt when a tensor is replaced or changed in place, dropped with
    ``values``). The copy costs about 0.56 x the bytes of the dense fp16 weight (kept values + metadata)."""
    versions = (ops.layout_version(values), ops.layout_version(meta), ops.layout_version(scales), ops.layout_version(zeros), group_size)
    return ops.cached_layout(values, ("sp24_semi_structured", dtype, in_features), versions,
                       lambda: _build_semi(values, meta, scales, zeros, group_size, in_features, dtype))


# ---- launchers ---------------------------------------------------------------------------------------

def _kernel_args(values, meta, scales, zeros):
    """(VALUES code, scales pointer, zeros pointer, PER_CHANNEL) of a launch; unused pointers get meta."""
    code = _KIND_CODE[sp24_kind(values)]
    per_channel = code != INT4 or scales.shape[0] == 1
    scales_arg = meta if scales is None else scales.contiguous()
    zeros_arg = meta if zeros is None else zeros.contiguous()
    return code, scales_arg, zeros_arg, per_channel


def dequantize(values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None, zeros: torch.Tensor | None,
               group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``dtype`` [N, in_features] of 2:4 tensors on values' device (bit-identical to
    ``qruntime.formats.packing.dequantize_sp24(...).to(dtype)``)."""
    n, kp = meta.shape[0], meta.shape[1] * 8
    out = torch.empty((n, in_features), dtype=dtype, device=values.device)
    values, meta = values.contiguous(), meta.contiguous()
    code, scales_arg, zeros_arg, _ = _kernel_args(values, meta, scales, zeros)
    grid = (triton.cdiv(n, 64), triton.cdiv(in_features, 128))
    _dequant_sp24_kernel[grid](
        values, meta, scales_arg, zeros_arg, out,
        n, in_features, kp, group_size, values.stride(0), meta.stride(0),
        VALUES=code, HAS_ZEROS=zeros is not None, BLOCK_N=64, BLOCK_K=128,
    )
    return out


def _gemm_path(x, values, meta, scales, zeros, group_size, bias, path):
    m, k = x.shape
    n = meta.shape[0]
    bias_x = None if bias is None else bias.to(x.dtype)
    if path == "sparse":
        semi = semi_structured(values, meta, scales, zeros, group_size, k, x.dtype)
        if semi is not None:
            return F.linear(x.contiguous(), semi, bias_x)
        path = "dequant"  # the warning was given when the conversion failed
    if path == "dequant":
        return F.linear(x, dequantize(values, meta, scales, zeros, group_size, k, x.dtype), bias_x)
    split = path == "splitk"
    out = launch_out(x, n, split)
    values, meta = values.contiguous(), meta.contiguous()
    code, scales_arg, zeros_arg, per_channel = _kernel_args(values, meta, scales, zeros)
    (_splitk if split else _gemm)[grid(m, n)](
        x, values, meta, scales_arg, zeros_arg, meta if bias is None else bias, out,
        m, n, k, meta.shape[1] * 8, m_bucket(m), group_size,
        x.stride(0), x.stride(1), values.stride(0), meta.stride(0), out.stride(0), out.stride(1),
        VALUES=code, HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, PER_CHANNEL=per_channel,
        DOT=dot_mode(x.dtype),
    )
    return out if out.dtype == x.dtype else out.to(x.dtype)


def sp24_linear(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor | None,
                zeros: torch.Tensor | None, group_size: int, bias: torch.Tensor | None,
                *, path: str | None = None) -> torch.Tensor:
    """y = x @ expand(values, meta).T + bias for a 2:4-sparse weight, on the GPU (or CPU tensors under
    TRITON_INTERPRET).

    Args:
        x: float16 / bfloat16 / float32 [M, K] (any strides). meta: uint8 [N, Kp / 8].
        values: float [N, Kp / 2] (``scales`` None), int8 [N, Kp / 2] (``scales`` float32 [N]) or packed
            INT4 uint8 [N, Kp / 4] (``scales`` float32 [Kp / group_size, N], ``zeros`` uint8 of that shape
            or None for symmetric).
        group_size: INT4: dense columns per scale group (Kp for per-channel); ignored otherwise.
        bias: [N] or None.
        path: ``"splitk"``, ``"gemm"``, ``"dequant"`` or ``"sparse"``; None lets :mod:`dispatch` choose
            by M (``sparse`` only where :func:`semi_structured_supported`).
    Returns:
        [M, N] in x's dtype.
    """
    check_sp24(x, values, meta, scales, zeros, group_size, bias)
    dispatch.check_devices("sp24_linear", x, values=values, meta=meta, scales=scales, zeros=zeros, bias=bias)
    n = meta.shape[0]
    if x.shape[0] == 0:
        return x.new_empty((0, n))

    def run(p):
        return _gemm_path(x, values, meta, scales, zeros, group_size, bias, p)

    paths = dispatch.candidates("sp24", x.shape[0])
    if "sparse" in paths and semi_structured_supported(x, n) is not None:
        paths = tuple(p for p in paths if p != "sparse")
    key = (tuple(values.shape), values.dtype, tuple(meta.shape), group_size, zeros is None, x.dtype, x.shape[1])
    path = dispatch.resolve("sp24", key, x, path, run, paths=paths)
    if path == "sparse":
        reason = semi_structured_supported(x, n)
        if reason is not None:
            warnings.warn(f"qruntime: sp24_linear path='sparse' unavailable ({reason}); running 'dequant'",
                          RuntimeWarning, stacklevel=2)
            path = "dequant"
    return run(path)
