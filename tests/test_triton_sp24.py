"""The 2:4-sparse Triton kernel (kernels/sp24.py) vs the float64 reference.

As tests/test_triton_kernels.py: without a GPU the kernels run in Triton's interpreter on CPU tensors
(conftest sets TRITON_INTERPRET=1); on a GPU the same tests run compiled (marked ``gpu``), plus the
semi-structured (cuSPARSELt / CUTLASS) path, which only exists there. Interpreter caveat: its ``tl.dot`` on
bf16 operands is wrong, so there bf16 tiles are upcast to fp32 just before the dot (exact, done by
``_common.dot_mode``); bf16 loads, dequantization and stores are still what runs.

Weights: random 2:4 masks (``nm_mask`` on random scores) on random weights, packed by ``pack_sp24``;
INT8 kept values quantized per row, INT4 with the scales / zero points of the dense pruned weight
(padded to Kp) and the codes of the kept values (docs/formats.md, "2:4 sparse"). Shapes: K tails that
are not multiples of any tile, K not a multiple of 8 (padded), N tails; M in {1, 3, 16, 17, 64}.
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from qruntime.ops import registry as ops
from qruntime.ops import reference
from qruntime.formats.packing import (
    dequantize_sp24, int4_codes, int4_params, nm_mask, pack_sp24, quantize_int8_per_channel, sp24_padded_k,
)

from conftest import REL_TOL, rel_error, require_module

triton = require_module("triton", "Triton (the test extra) is not installed")

from qruntime.ops import triton_backend  # noqa: E402
from qruntime.kernels import _common, dispatch  # noqa: E402
from qruntime.kernels import sp24 as ks24  # noqa: E402
from qruntime.kernels import w8a16 as k8  # noqa: E402

GPU = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="interpret", marks=pytest.mark.skipif(
        not _common.interpreting(), reason="TRITON_INTERPRET is off: the kernels are compiled for the GPU")),
    pytest.param("cuda", id="cuda",
                 marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")]),
]
M_LIST = (1, 3, 16, 17, 64)
# (K, N): K tails of every tile size, K = 203 and 90 not multiples of 8 (padded to 208, 96), N tails
SHAPES = ((200, 72), (576, 96), (1000, 40), (203, 72), (90, 33))
DTYPES = (torch.float16, torch.bfloat16)
KINDS = ("float", "int8", "int4")
GROUPS = ((None, True), (None, False), (32, True), (32, False), (64, True), (64, False), (128, True), (128, False))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _x(m, k, dtype, device):
    return (torch.randn(m, k, device=device) * 2).to(dtype)


def _sparse_weight(n, k):
    """A random weight [N, K] pruned to 2:4 by random scores."""
    return torch.randn(n, k) * nm_mask(torch.rand(n, k))


def _pack(w, kind, dtype=torch.float16, group=None, symmetric=False):
    """(values, meta, scales, zeros, group_size) of a 2:4 weight: float values in ``dtype``, INT8 codes of
    the kept values (per row) or INT4 codes on the grid of the dense pruned weight padded to Kp."""
    if kind == "float":
        values, meta = pack_sp24(w.to(dtype))
        return values, meta, None, None, 0
    if kind == "int8":
        kept, meta = pack_sp24(w)
        q, s = quantize_int8_per_channel(kept)
        return q, meta, s, None, 0
    n, k = w.shape
    kp = sp24_padded_k(k, group)
    padded = torch.zeros(n, kp)
    padded[:, :k] = w
    scales, zeros, gs = int4_params(padded, group, symmetric)  # per-channel: gs = Kp
    kept, meta = pack_sp24(w, group)
    return int4_codes(kept, scales, zeros, gs // 2), meta, scales, zeros, gs


def _to(device, *items):
    """The tensors among ``items`` moved to ``device`` (None and ints pass through)."""
    return tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in items)


def _ref(x, values, meta, scales, zeros, gs, bias):
    bias = None if bias is None else bias.double()
    return reference.sp24_linear(x.double(), values, meta, scales, zeros, gs, bias)


def _tol(dtype):
    return REL_TOL[dtype]


def _sparse_warning(x, n, path):
    """A forced ``sparse`` path where it cannot run falls back to ``dequant`` with a warning."""
    if path == "sparse" and ks24.semi_structured_supported(x, n) is not None:
        return pytest.warns(RuntimeWarning, match="path='sparse' unavailable")
    return contextlib.nullcontext()


# ---- every kept-value format, M and dtype --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, shape", list(zip(M_LIST, SHAPES)))
def test_sp24_matches_reference(device, kind, dtype, m, shape):
    k, n = shape
    values, meta, scales, zeros, gs = _to(device, *_pack(_sparse_weight(n, k), kind, dtype, 32, False))
    bias = torch.randn(n, device=device)
    x = _x(m, k, dtype, device)
    y = ks24.sp24_linear(x, values, meta, scales, zeros, gs, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_error(y, _ref(x, values, meta, scales, zeros, gs, bias)) < _tol(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, symmetric", GROUPS)
def test_sp24_int4_every_group_and_symmetry(device, dtype, group, symmetric):
    # the M and shape rotate with the group variant, so every M meets several variants
    i = GROUPS.index((group, symmetric)) + DTYPES.index(dtype)
    m, (k, n) = M_LIST[i % len(M_LIST)], SHAPES[(i + 1) % len(SHAPES)]
    packed = _pack(_sparse_weight(n, k), "int4", group=group, symmetric=symmetric)
    values, meta, scales, zeros, gs = _to(device, *packed)
    assert gs == (sp24_padded_k(k) if group is None else group)
    bias = torch.randn(n, device=device) if i % 2 else None
    x = _x(m, k, dtype, device)
    y = ks24.sp24_linear(x, values, meta, scales, zeros, gs, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_error(y, _ref(x, values, meta, scales, zeros, gs, bias)) < _tol(dtype)


@pytest.mark.parametrize("x_dtype, values_dtype", [
    (torch.float32, torch.float16), (torch.float16, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float32, torch.float32)])
def test_sp24_values_in_another_dtype(device, x_dtype, values_dtype):
    """Float values are rounded to x's dtype in the kernel, as the reference does."""
    values, meta, _, _, _ = _to(device, *_pack(_sparse_weight(40, 200), "float", values_dtype))
    x = _x(5, 200, x_dtype, device)
    for path in ("splitk", "gemm"):
        y = ks24.sp24_linear(x, values, meta, None, None, 0, None, path=path)
        assert y.dtype == x_dtype
        assert rel_error(y, _ref(x, values, meta, None, None, 0, None)) < _tol(x_dtype)


# ---- every path ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", dispatch.SP24_PATHS)
@pytest.mark.parametrize("kind, group, symmetric", [("float", None, False), ("int8", None, False),
                                                    ("int4", 64, False), ("int4", None, True), ("int4", 16, True)])
def test_sp24_every_path(device, path, kind, group, symmetric):
    k, n = 320, 96  # the semi-structured path's multiples (K of 64, N of 32): it runs on a GPU
    packed = _pack(_sparse_weight(n, k), kind, torch.float16, group, symmetric)
    values, meta, scales, zeros, gs = _to(device, *packed)
    cases = ((torch.float16, torch.randn(n, device=device)), (torch.bfloat16, None), (torch.float32, None))
    for dtype, bias in cases:
        x = _x(19, k, dtype, device)
        with _sparse_warning(x, n, path):
            y = ks24.sp24_linear(x, values, meta, scales, zeros, gs, bias, path=path)
        assert y.dtype == dtype and y.shape == (19, n)
        assert rel_error(y, _ref(x, values, meta, scales, zeros, gs, bias)) < _tol(dtype)


@pytest.mark.parametrize("forced", ["splitk", "gemm", "dequant", "sparse"])
def test_sp24_path_environment_variable(device, monkeypatch, forced):
    values, meta, scales, zeros, gs = _to(device, *_pack(_sparse_weight(64, 192), "int4", group=64))
    x = _x(17, 192, torch.float16, device)
    monkeypatch.setenv(dispatch.PATH_ENV, forced)
    with _sparse_warning(x, 64, forced):
        y = ks24.sp24_linear(x, values, meta, scales, zeros, gs, None)
    assert dispatch.last_path() == forced
    assert rel_error(y, _ref(x, values, meta, scales, zeros, gs, None)) < _tol(torch.float16)


def test_sp24_heuristic_paths(device, monkeypatch):
    values, meta, _, _, _ = _to(device, *_pack(_sparse_weight(48, 96), "float"))
    monkeypatch.setenv(dispatch.PATH_ENV, "heuristic")
    for m, expected in ((16, "splitk"), (17, "gemm")):
        x = _x(m, 96, torch.float16, device)
        y = ks24.sp24_linear(x, values, meta, None, None, 0, None)
        assert dispatch.last_path() == expected
        assert rel_error(y, _ref(x, values, meta, None, None, 0, None)) < _tol(torch.float16)


def test_sp24_dispatch_rules(monkeypatch):
    assert dispatch.candidates("sp24", 1) == ("splitk", "gemm")
    assert dispatch.candidates("sp24", 256) == ("gemm", "dequant", "sparse")
    # the other kinds are unchanged
    assert dispatch.candidates("w8a16", 4096) == ("gemm", "dequant")
    assert dispatch.candidates("w8a8", 4096) == ("gemm",)
    assert dispatch.heuristic("sp24", 16) == "splitk" and dispatch.heuristic("sp24", 17) == "gemm"
    dispatch.check_path("sp24", "sparse")
    with pytest.raises(ValueError, match="only 2:4 weights"):
        dispatch.check_path("w4a16", "sparse")
    with pytest.raises(ValueError, match="path='fast'"):
        dispatch.check_path("sp24", "fast")
    x = torch.randn(3, 8)
    monkeypatch.setenv(dispatch.PATH_ENV, "sparse")
    assert dispatch.choose("sp24", (), x, lambda p: x) == "sparse"
    # the launcher narrows the candidates (no semi-structured path here): the heuristic still decides
    monkeypatch.setenv(dispatch.PATH_ENV, "auto")
    assert dispatch.choose("sp24", (), torch.randn(300, 8), lambda p: x, paths=("gemm", "dequant")) == "gemm"


# ---- the dense expansion, inputs, registration ------------------------------------------------------------

def test_sp24_dequantize_kernel_is_bit_exact(device):
    w = _sparse_weight(70, 203)
    cases = [("float", torch.float16, None, False), ("float", torch.float32, None, False),
             ("int8", None, None, False), ("int4", None, None, True), ("int4", None, 32, False),
             ("int4", None, 128, True)]
    for kind, values_dtype, group, symmetric in cases:
        values, meta, scales, zeros, gs = _pack(w, kind, values_dtype or torch.float16, group, symmetric)
        want = dequantize_sp24(values, meta, scales, zeros, gs, 203)
        for dtype in DTYPES:
            got = ks24.dequantize(*_to(device, values, meta, scales, zeros), gs, 203, dtype).cpu()
            assert torch.equal(got, want.to(dtype)), (kind, group, dtype)


def test_sp24_strided_and_empty_inputs(device):
    values, meta, scales, _, _ = _to(device, *_pack(_sparse_weight(40, 64), "int8"))
    wide = _x(6, 128, torch.float16, device)
    x = wide[:, ::2]  # non-contiguous: stride 2 along K
    for path in dispatch.PATHS:
        y = ks24.sp24_linear(x, values, meta, scales, None, 0, None, path=path)
        assert rel_error(y, _ref(x, values, meta, scales, None, 0, None)) < _tol(torch.float16)
    assert ks24.sp24_linear(x[:0], values, meta, scales, None, 0, None).shape == (0, 40)


def test_sp24_bad_inputs_raise_with_values(device):
    values, meta, scales, zeros, gs = _to(device, *_pack(_sparse_weight(8, 64), "int4", group=32))
    x = _x(2, 64, torch.float16, device)
    with pytest.raises(ValueError, match=r"values: shape \(8, 16\), expected \(8, 14\) for meta \(8, 7\)"):
        ks24.sp24_linear(x, values, meta[:, :7], scales, zeros, gs, None)
    with pytest.raises(ValueError, match=r"x: K=72 does not match"):
        ks24.sp24_linear(_x(2, 72, torch.float16, device), values, meta, scales, zeros, gs, None)
    with pytest.raises(ValueError, match="group_size=48"):
        ks24.sp24_linear(x, values, meta, scales, zeros, 48, None)
    with pytest.raises(ValueError, match=r"scales: shape \(1, 8\), expected \(2, 8\)"):
        ks24.sp24_linear(x, values, meta, scales[:1], zeros, gs, None)
    with pytest.raises(TypeError, match="meta: dtype torch.int8"):
        ks24.sp24_linear(x, values, meta.to(torch.int8), scales, zeros, gs, None)
    with pytest.raises(ValueError, match="path='fast'"):
        ks24.sp24_linear(x, values, meta, scales, zeros, gs, None, path="fast")
    with pytest.raises(ValueError, match=r"bias is on meta"):
        ks24.sp24_linear(x, values, meta, scales, zeros, gs, torch.empty(8, device="meta"))
    fvalues, fmeta, _, _, _ = _to(device, *_pack(_sparse_weight(8, 64), "float"))
    with pytest.raises(ValueError, match="scales/zeros given with float values"):
        ks24.sp24_linear(x, fvalues, fmeta, scales, None, 0, None)
    q8, s8 = quantize_int8_per_channel(torch.randn(8, 64))
    with pytest.raises(ValueError, match="only 2:4 weights"):
        k8.w8a16_linear(x, q8.to(device), s8.to(device), None, path="sparse")


def test_sp24_configs_keep_one_for_every_group():
    for group, bucket, configs in itertools.product((None, 16, 32, 64, 128), (1, 16, 128, 4096),
                                                    (ks24.SPLITK_CONFIGS, ks24.GEMM_CONFIGS)):
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, bucket) and _common.fits(
            c, x_bytes=2, w_bytes=1, k=4096, group_size=group, smem_limit=None)]
        assert kept, (group, bucket)
    # the expansion splits a K tile into meta bytes (8 columns) and groups of 4: BLOCK_K % 8 == 0
    for cfg in ks24.SPLITK_CONFIGS + ks24.GEMM_CONFIGS + ks24.INTERPRET_SPLITK + ks24.INTERPRET_GEMM:
        assert cfg.kwargs["BLOCK_K"] % 8 == 0 and cfg.kwargs["BLOCK_K"] >= 16


def test_sp24_registered_as_the_cuda_kernel(device):
    assert "sp24" in triton_backend.FAMILIES and triton_backend.load("sp24") is ks24
    assert torch._C._dispatch_has_kernel_for_dispatch_key(ops.sp24_linear._qualname, "CUDA")
    values, meta, scales, zeros, gs = _to(device, *_pack(_sparse_weight(48, 96), "int4", group=32))
    x, bias = _x(5, 96, torch.float16, device), torch.randn(48, device=device)
    y = triton_backend.cuda_sp24(x, values, meta, scales, zeros, gs, bias)
    assert rel_error(y, _ref(x, values, meta, scales, zeros, gs, bias)) < _tol(torch.float16)


def test_semi_structured_is_unavailable_without_a_gpu():
    x = torch.randn(300, 256, dtype=torch.float16)
    assert "CUDA" in ks24.semi_structured_supported(x, 128)


# ---- GPU only: the semi-structured path, opcheck, measured dispatch ----------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, group", [("float", None), ("int8", None), ("int4", 128)])
def test_semi_structured_path_matches_reference(dtype, kind, group):
    k, n = 512, 256
    values, meta, scales, zeros, gs = _to("cuda", *_pack(_sparse_weight(n, k), kind, dtype, group))
    bias = torch.randn(n, device="cuda")
    x = _x(300, k, dtype, "cuda")
    reason = ks24.semi_structured_supported(x, n)
    if reason is not None:
        pytest.skip(f"semi-structured sparse path not available here: {reason}")
    semi = ks24.semi_structured(values, meta, scales, zeros, gs, k, dtype)
    assert semi is not None, "conversion or probe product failed (see the warning)"
    assert ks24.semi_structured(values, meta, scales, zeros, gs, k, dtype) is semi  # cached
    for m in (300, 17):
        xm = x[:m]
        y = ks24.sp24_linear(xm, values, meta, scales, zeros, gs, bias, path="sparse")
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_error(y, _ref(xm, values, meta, scales, zeros, gs, bias)) < _tol(dtype)
    values.add_(0)  # an in-place change (version bump) rebuilds the cached copy
    assert ks24.semi_structured(values, meta, scales, zeros, gs, k, dtype) is not semi


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
def test_sp24_opcheck_on_cuda():
    values, meta, scales, zeros, gs = _to("cuda", *_pack(_sparse_weight(48, 96), "int4", group=32))
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16, requires_grad=True)
    bias = torch.randn(48, device="cuda", dtype=torch.float16)
    torch.library.opcheck(ops.sp24_linear, (x, values, meta, scales, zeros, gs, bias))
    fvalues, fmeta, _, _, _ = _to("cuda", *_pack(_sparse_weight(48, 96), "float"))
    torch.library.opcheck(ops.sp24_linear, (x, fvalues, fmeta, None, None, 0, None))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
def test_sp24_measured_dispatch_times_every_candidate():
    dispatch.reset()
    values, meta, _, _, _ = _to("cuda", *_pack(_sparse_weight(1024, 1024), "float"))
    x = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    y = ks24.sp24_linear(x, values, meta, None, None, 0, None)
    (path, times), = dispatch.chosen().values()
    expected = set(dispatch.candidates("sp24", 512))
    if ks24.semi_structured_supported(x, 1024) is not None:
        expected.discard("sparse")
    assert set(times) == expected and path == min(times, key=times.get)
    assert rel_error(y, _ref(x, values, meta, None, None, 0, None)) < _tol(torch.float16)


def test_int4_zero_point_configs_are_pruned_only_for_grouped_int4_with_zeros():
    # the configs kernels/aot.py found loading zero points a byte per row per thread are dropped for grouped
    # INT4 launches with zero points, kept for every other kind; the shared constraints still apply
    listed = [c for c in ks24.GEMM_CONFIGS if ks24.drops_for_int4_zeros(c)]
    assert len(listed) == len(ks24.INT4_ZERO_BYTE_LOADS) == 3
    x = torch.empty(64, 4096, dtype=torch.float16)
    named = {"x_ptr": x, "M": 4096, "N": 4096, "K": 4096, "m_bucket": 4096, "group_size": 128}

    def kept(**launch):
        return ks24._prune(ks24.GEMM_CONFIGS, named, **launch)

    grouped = kept(VALUES=ks24.INT4, HAS_ZEROS=True, PER_CHANNEL=False)
    assert not any(ks24.drops_for_int4_zeros(c) for c in grouped)
    assert all(c.kwargs["BLOCK_K"] <= 128 and 128 % c.kwargs["BLOCK_K"] == 0 for c in grouped) and grouped
    everything = kept(VALUES=ks24.FLOAT, HAS_ZEROS=False, PER_CHANNEL=True)
    assert set(map(str, everything)) == set(map(str, grouped)) | set(map(str, listed))
    for launch in ({"VALUES": ks24.INT8, "HAS_ZEROS": False, "PER_CHANNEL": True},
                   {"VALUES": ks24.INT4, "HAS_ZEROS": False, "PER_CHANNEL": False},  # symmetric: no zero points
                   {"VALUES": ks24.INT4, "HAS_ZEROS": True, "PER_CHANNEL": True}):   # loaded once, before the loop
        assert len(kept(**launch)) == len(everything), launch
    # never leaves the autotuner nothing: a launch only the listed configs could serve keeps them
    only = ks24._prune(listed, named, VALUES=ks24.INT4, HAS_ZEROS=True, PER_CHANNEL=False)
    assert only == listed
