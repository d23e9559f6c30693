"""Triton kernels vs the float64 reference.

Without a GPU they run in Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1); on a
machine with a GPU the same tests run compiled on CUDA (marked ``gpu``). Interpreter caveat: Triton's
interpreter computes ``tl.dot`` on bf16 operands wrongly, so there the bf16 operands are upcast to fp32
just before the dot (exact: bf16 products fit in fp32); bf16 loads, dequantization and stores are still
what runs. Shapes are small enough for the interpreter; every M of the issue's list, K/N tails that are
not multiples of any tile, every group size and symmetry, fp16 and bf16 (fp32 on a few).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from qruntime.ops import registry as ops
from qruntime.ops import reference
from qruntime.formats.packing import quantize_int4, quantize_int8_per_channel

from conftest import REL_TOL, rel_error, require_module

triton = require_module("triton", "Triton (the test extra) is not installed")

from qruntime.ops import triton_backend  # noqa: E402
from qruntime.kernels import _common, dispatch  # noqa: E402
from qruntime.kernels import w4a16 as k4  # noqa: E402
from qruntime.kernels import w8a8 as k8a8  # noqa: E402
from qruntime.kernels import w8a16 as k8  # noqa: E402

GPU = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="interpret", marks=pytest.mark.skipif(
        not _common.interpreting(), reason="TRITON_INTERPRET is off: the kernels are compiled for the GPU")),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")]),
]
M_LIST = (1, 3, 16, 17, 64, 118)
# (K, N) pairs with tails that are not multiples of any tile size; cycled against M to bound test time
SHAPES = ((576, 1536), (1000, 576), (1536, 200), (576, 1000), (1000, 330), (200, 576))
DTYPES = (torch.float16, torch.bfloat16)
GROUPS = ((None, True), (None, False), (32, True), (32, False), (64, True), (64, False), (128, True), (128, False))


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _x(m, k, dtype, device):
    return (torch.randn(m, k, device=device) * 2).to(dtype)


def _w8_ref(x, qweight, scales, bias):
    return reference.w8a16_linear(x.double(), qweight, scales, None if bias is None else bias.double())


def _w4_ref(x, qweight, scales, zeros, gs, bias):
    return reference.w4a16_linear(x.double(), qweight, scales, zeros, gs, None if bias is None else bias.double())


def _w8a8_ref(x, qweight, scales, bias):
    # the op's definition: codes from x in its own dtype, exact integer sums, scales in float64
    return reference.w8a8_linear(x, qweight, scales, None if bias is None else bias.double().to(x.dtype)).double()


def _tol(dtype):
    return REL_TOL[dtype]


# ---- W8A16 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["w8a16", "w8a8"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, shape", list(zip(M_LIST, SHAPES)))
def test_int8_kernels_match_reference(device, op, dtype, m, shape):
    k, n = shape
    qweight, scales = quantize_int8_per_channel(torch.randn(n, k))
    qweight, scales, bias = qweight.to(device), scales.to(device), torch.randn(n, device=device)
    x = _x(m, k, dtype, device)
    if op == "w8a16":
        y, ref = k8.w8a16_linear(x, qweight, scales, bias), _w8_ref(x, qweight, scales, bias)
    else:
        y, ref = k8a8.w8a8_linear(x, qweight, scales, bias), _w8a8_ref(x.cpu(), qweight.cpu(), scales.cpu(), bias.cpu())
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_error(y, ref) < _tol(dtype)


@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("dtype", DTYPES + (torch.float32,))
def test_w8a16_every_path(device, path, dtype):
    qweight, scales = quantize_int8_per_channel(torch.randn(300, 520))
    qweight, scales = qweight.to(device), scales.to(device)
    x = _x(17, 520, dtype, device)
    for bias in (None, torch.randn(300, device=device)):
        y = k8.w8a16_linear(x, qweight, scales, bias, path=path)
        assert rel_error(y, _w8_ref(x, qweight, scales, bias)) < _tol(dtype)


# ---- W4A16 ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group, symmetric", GROUPS)
def test_w4a16_every_group_and_symmetry(device, dtype, group, symmetric):
    # the M and shape rotate with the group variant, so every M meets several variants
    i = GROUPS.index((group, symmetric)) + DTYPES.index(dtype)
    m, (k, n) = M_LIST[i % len(M_LIST)], SHAPES[(i + 1) % len(SHAPES)]
    qweight, scales, zeros, gs = quantize_int4(torch.randn(n, k), group, symmetric)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    qweight, scales, zeros, bias = to(qweight), to(scales), to(zeros), torch.randn(n, device=device)
    x = _x(m, k, dtype, device)
    y = k4.w4a16_linear(x, qweight, scales, zeros, gs, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_error(y, _w4_ref(x, qweight, scales, zeros, gs, bias)) < _tol(dtype)


@pytest.mark.parametrize("m", M_LIST)
def test_w4a16_every_m(device, m):
    k, n = 1000, 576  # K=1000 is padded to 1024 for group 128
    qweight, scales, zeros, gs = quantize_int4(torch.randn(n, k), 128, False)
    qweight, scales, zeros = qweight.to(device), scales.to(device), zeros.to(device)
    x = _x(m, k, torch.float16, device)
    y = k4.w4a16_linear(x, qweight, scales, zeros, gs, None)
    assert rel_error(y, _w4_ref(x, qweight, scales, zeros, gs, None)) < _tol(torch.float16)


@pytest.mark.parametrize("path", dispatch.PATHS)
@pytest.mark.parametrize("group, symmetric", [(None, False), (16, True), (64, False)])
def test_w4a16_every_path(device, path, group, symmetric):
    qweight, scales, zeros, gs = quantize_int4(torch.randn(130, 200), group, symmetric)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    qweight, scales, zeros = to(qweight), to(scales), to(zeros)
    for dtype, bias in ((torch.float16, torch.randn(130, device=device)), (torch.float32, None)):
        x = _x(19, 200, dtype, device)
        y = k4.w4a16_linear(x, qweight, scales, zeros, gs, bias, path=path)
        assert rel_error(y, _w4_ref(x, qweight, scales, zeros, gs, bias)) < _tol(dtype)


def test_w4a16_single_group_is_per_channel(device):
    """K <= group_size: one group, run as per-channel (scale in the epilogue)."""
    qweight, scales, zeros, gs = quantize_int4(torch.randn(64, 100), 128, False)
    assert scales.shape[0] == 1
    x = _x(5, 100, torch.float16, device)
    y = k4.w4a16_linear(x, qweight.to(device), scales.to(device), zeros.to(device), gs, None)
    assert rel_error(y, _w4_ref(x, qweight.to(device), scales.to(device), zeros.to(device), gs, None)) < 2e-3


def test_dequantize_kernels_are_bit_exact(device):
    w = torch.randn(70, 300)
    qweight, scales = quantize_int8_per_channel(w)
    for dtype in DTYPES:
        got = k8.dequantize(qweight.to(device), scales.to(device), dtype).cpu()
        assert torch.equal(got, reference.dequantize_int8(qweight, scales).to(dtype))
    for group, symmetric in GROUPS[:4]:
        q4, s4, z4, gs = quantize_int4(w, group, symmetric)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        got = k4.dequantize(to(q4), to(s4), to(z4), gs, 300, torch.bfloat16).cpu()
        assert torch.equal(got, reference.dequantize_int4(q4, s4, z4, gs, 300).to(torch.bfloat16))


# ---- W8A8 ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (torch.float32,))
def test_quantize_per_token_is_bit_identical(device, dtype):
    x = _x(37, 1500, dtype, device)
    x[3] = 0  # a zero row: scale 0, codes 0
    x[5, :4] = torch.tensor([0.5, -0.5, 1.5, 2.5]) * (x[5].abs().max() / 127)  # ties at the code grid
    xq, a = k8a8.quantize_per_token(x)
    rq, ra = reference.quantize_per_token(x.cpu())
    assert torch.equal(xq.cpu(), rq) and torch.equal(a.cpu(), ra)


@pytest.mark.parametrize("path", ["splitk", "gemm"])
def test_w8a8_every_path(device, path):
    qweight, scales = quantize_int8_per_channel(torch.randn(150, 333))
    x = _x(20, 333, torch.float16, device)
    for bias in (None, torch.randn(150)):
        y = k8a8.w8a8_linear(x, qweight.to(device), scales.to(device), None if bias is None else bias.to(device),
                             path=path)
        assert rel_error(y, _w8a8_ref(x.cpu(), qweight, scales, bias)) < _tol(torch.float16)


# ---- inputs, dispatch, registration -------------------------------------------------------------------

def test_strided_and_empty_inputs(device):
    qweight, scales = quantize_int8_per_channel(torch.randn(40, 64))
    qweight, scales = qweight.to(device), scales.to(device)
    wide = _x(6, 128, torch.float16, device)
    x = wide[:, ::2]  # non-contiguous: stride 2 along K
    assert rel_error(k8.w8a16_linear(x, qweight, scales, None), _w8_ref(x, qweight, scales, None)) < 2e-3
    ref = _w8a8_ref(x.cpu(), qweight.cpu(), scales.cpu(), None)
    assert rel_error(k8a8.w8a8_linear(x, qweight, scales, None), ref) < 2e-3
    for fn in (k8.w8a16_linear, k8a8.w8a8_linear):
        assert fn(x[:0], qweight, scales, None).shape == (0, 40)


def test_bad_inputs_raise_with_values(device):
    qweight, scales = quantize_int8_per_channel(torch.randn(8, 32))
    qweight, scales = qweight.to(device), scales.to(device)
    x = _x(2, 32, torch.float16, device)
    with pytest.raises(ValueError, match=r"K=31.*K=32"):
        k8.w8a16_linear(x[:, :31], qweight, scales, None)
    with pytest.raises(TypeError, match="int8"):
        k8.w8a16_linear(x, qweight.to(torch.int16), scales, None)
    with pytest.raises(ValueError, match=r"scales: shape \(7,\)"):
        k8a8.w8a8_linear(x, qweight, scales[:7], None)
    with pytest.raises(ValueError, match="path='fast'"):
        k8.w8a16_linear(x, qweight, scales, None, path="fast")
    with pytest.raises(ValueError, match="W8A8 has no dequantize path"):
        k8a8.w8a8_linear(x, qweight, scales, None, path="dequant")
    with pytest.raises(ValueError, match=r"bias is on meta"):
        k8.w8a16_linear(x, qweight, scales, torch.empty(8, device="meta"))
    q4, s4, z4, gs = quantize_int4(torch.randn(8, 64), 32, False)
    with pytest.raises(ValueError, match="group_size=48"):
        k4.w4a16_linear(_x(2, 64, torch.float16, device), q4.to(device), s4.to(device), z4.to(device), 48, None)


def test_m_buckets_and_heuristic():
    assert [_common.m_bucket(m) for m in (1, 2, 3, 16, 17, 118, 4096, 10000)] == [1, 2, 4, 16, 32, 128, 4096, 4096]
    assert dispatch.heuristic("w4a16", 16) == "splitk" and dispatch.heuristic("w4a16", 17) == "gemm"
    assert dispatch.candidates("w8a16", 1) == ("splitk", "gemm")
    assert dispatch.candidates("w8a16", 4096) == ("gemm", "dequant")
    assert dispatch.candidates("w8a8", 4096) == ("gemm",)


def test_path_environment_variable(monkeypatch):
    x = torch.randn(3, 8)
    monkeypatch.setenv(dispatch.PATH_ENV, "gemm")
    assert dispatch.choose("w8a16", (), x, lambda p: x) == "gemm"
    monkeypatch.setenv(dispatch.PATH_ENV, "heuristic")
    assert dispatch.choose("w8a16", (), x, lambda p: x) == "splitk"
    monkeypatch.setenv(dispatch.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="QRUNTIME_TRITON_PATH='fastest'"):
        dispatch.choose("w8a16", (), x, lambda p: x)


def test_config_constraints():
    cfg = _common.config(16, 64, 128, 4)
    assert _common.fits(cfg, x_bytes=2, w_bytes=1, k=4096, group_size=128, smem_limit=None)
    assert not _common.fits(cfg, x_bytes=2, w_bytes=1, k=4096, group_size=64, smem_limit=None)  # BLOCK_K > group
    assert not _common.fits(cfg, x_bytes=2, w_bytes=1, k=300, group_size=None, smem_limit=None)  # 3 K tiles < 4 splits
    assert not _common.fits(_common.config(16, 64, 16), x_bytes=1, w_bytes=1, k=64, group_size=None,
                            smem_limit=None, min_block_k=32)  # int8 dots need BLOCK_K >= 32
    with pytest.raises(ValueError, match="no kernel configuration"):
        _common.keep([cfg], lambda c: False, "w4a16 M=1")
    # every tuned config list keeps at least one config for every group size and M bucket
    for module, groups in ((k8, (None,)), (k4, (None, 16, 32, 64, 128)), (k8a8, (None,))):
        for group, bucket, configs in itertools.product(groups, (1, 16, 128, 4096),
                                                         (module.SPLITK_CONFIGS, module.GEMM_CONFIGS)):
            kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(32, bucket) and _common.fits(
                c, x_bytes=2, w_bytes=1, k=4096, group_size=group, smem_limit=None,
                min_block_k=32 if module is k8a8 else 16)]
            assert kept, (module.__name__, group, bucket)


def test_registered_as_the_cuda_kernels():
    for op in (ops.w8a16_linear, ops.w4a16_linear, ops.w8a8_linear):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op._qualname, "CUDA"), op._qualname


def test_cuda_registrations_call_the_launchers(device):
    """The functions registered for CUDA pass the op's arguments through in order."""
    w = torch.randn(48, 96)
    qweight, scales = quantize_int8_per_channel(w)
    q4, s4, z4, gs = quantize_int4(w, 32, False)
    x, bias = _x(5, 96, torch.float16, device), torch.randn(48, device=device)
    qweight, scales, q4, s4, z4 = (t.to(device) for t in (qweight, scales, q4, s4, z4))
    assert rel_error(triton_backend.cuda_w8a16(x, qweight, scales, bias), _w8_ref(x, qweight, scales, bias)) < 2e-3
    assert rel_error(triton_backend.cuda_w4a16(x, q4, s4, z4, gs, bias), _w4_ref(x, q4, s4, z4, gs, bias)) < 2e-3
    ref = _w8a8_ref(x.cpu(), qweight.cpu(), scales.cpu(), bias.cpu())
    assert rel_error(triton_backend.cuda_w8a8(x, qweight, scales, bias), ref) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
def test_opcheck_on_cuda():
    qweight, scales = quantize_int8_per_channel(torch.randn(48, 96))
    q4, s4, z4, gs = quantize_int4(torch.randn(48, 96), 32, False)
    x = torch.randn(5, 96, device="cuda", dtype=torch.float16, requires_grad=True)
    bias = torch.randn(48, device="cuda", dtype=torch.float16)
    torch.library.opcheck(ops.w8a16_linear, (x, qweight.cuda(), scales.cuda(), bias))
    torch.library.opcheck(ops.w8a8_linear, (x, qweight.cuda(), scales.cuda(), bias))
    torch.library.opcheck(ops.w4a16_linear, (x, q4.cuda(), s4.cuda(), z4.cuda(), gs, bias))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
def test_measured_dispatch_picks_a_timed_path():
    dispatch.reset()
    qweight, scales = quantize_int8_per_channel(torch.randn(1024, 1024))
    x = torch.randn(4, 1024, device="cuda", dtype=torch.float16)
    k8.w8a16_linear(x, qweight.cuda(), scales.cuda(), None)
    (path, times), = dispatch.chosen().values()
    assert set(times) == set(dispatch.candidates("w8a16", 4)) and path == min(times, key=times.get)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("preset", ["w8a16", "w8a8-nosq", "w4a16-g32-rtn"])
def test_compressed_model_on_cuda_compiles_without_graph_breaks(tiny_llama, preset):
    from qruntime import compress

    compress(tiny_llama, preset, progress=False)
    model = tiny_llama.to("cuda", torch.float16)
    ids = torch.randint(0, 128, (2, 8), device="cuda")
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits
    assert rel_error(compiled, eager) < 1e-2


def test_gpu_benchmark_script_runs_under_the_interpreter(tmp_path, monkeypatch):
    """bench/bench_gpu_kernels.py end to end on tiny shapes (--smoke): the table, the target lines and the
    JSON a GPU run writes, without a GPU."""
    if not _common.interpreting():
        pytest.skip("--smoke needs TRITON_INTERPRET=1 (on a GPU machine, run the benchmark itself)")
    import json
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))
    sys.modules.pop("bench_gpu_kernels", None)
    import bench_gpu_kernels

    out = tmp_path / "gpu.json"
    assert bench_gpu_kernels.main(["--smoke", "--e2e", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    methods = {(r["method"], r["path"].split(":")[0]) for r in payload["rows"]}
    assert ("fp16", "cublas") in methods and ("w4a16-g128", "auto") in methods and ("w8a8", "gemm") in methods
    assert all(r["rel_err"] < 2e-2 for r in payload["rows"] if "rel_err" in r)
    assert {r["recipe"] for r in payload["e2e_decode"]} == {"fp16", "w8a16", "w4a16-g128-rtn", "w8a8-nosq"}
    assert any(line.startswith("dispatched path") for line in payload["targets"])
