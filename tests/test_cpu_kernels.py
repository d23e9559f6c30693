"""The C++ CPU kernels on every ISA level this CPU can run, against float64 oracles; the CPU layouts'
round trips; the extension's argument checks (Python exceptions with the values, never a crash)."""
import gc
import os

import numpy as np
import pytest
import torch

from conftest import REL_TOL, rel_error, require
from qruntime.ops import registry as ops
from qruntime.ops import reference
from qruntime.ops.extension import extension
from qruntime.formats.cpu_layout import (
    cpu_int4,
    cpu_int8,
    pack_int4_panels,
    pack_int8_panels,
    pack_int8_vnni,
    pad_channels,
    unpack_int4_panels,
    unpack_int8_panels,
    unpack_int8_vnni,
)
from qruntime.formats.packing import quantize_int4, quantize_int8_per_channel, unpack_int4

require(extension() is not None, "the C++ extension qruntime.ops._C is not built",
        allowed="disabled by QRUNTIME_DISABLE_EXTENSION" if os.environ.get("QRUNTIME_DISABLE_EXTENSION", "") not in ("", "0") else None)
ISAS = ops.supported_cpu_isas() or ["none"]
MS = [1, 2, 3, 15, 16, 17, 128, 129]
KN = [(100, 77), (200, 33), (61, 130)]  # K, N: not multiples of 16 / 32 / 64


def _oracle_w8(x, q, s, b):
    return x.double() @ (q.double() * s.double()[:, None]).t() + b.double()


def _oracle_w4(x, q, s, z, gs, b):
    k = x.shape[1]
    g = torch.arange(k) // gs
    zz = 8.0 if z is None else z.double()[g].t()
    w = (unpack_int4(q).double()[:, :k] - zz) * s.double()[g].t()
    return x.double() @ w.t() + b.double()


def _bf16_rows(isa):
    """M from which `isa` multiplies W8A16 / W4A16 in bf16 (None: never)."""
    if isa == "none":
        return None
    with ops.use_cpu_isa(isa):
        return ops.cpu_bf16_rows()


def _tolerance(isa, m):
    """fp32 products below the level's bf16 threshold, bf16 products (autocast's error) from it on."""
    rows = _bf16_rows(isa)
    return REL_TOL[torch.bfloat16 if rows is not None and m >= rows else torch.float32]


def _oracle_w8a8(x, q, s, b):
    xq, a = reference.quantize_per_token(x)
    return (xq.double() @ q.double().t()) * a.double()[:, None] * s.double() + b.double()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("op", ["w8a16", "w8a8"])
def test_int8_kernels(isa, m, op):
    k, n = KN[m % len(KN)]
    q, s = quantize_int8_per_channel(torch.randn(n, k))
    x, b = torch.randn(m, k) * 3, torch.randn(n)
    with ops.use_cpu_isa(isa):
        y = getattr(ops, f"{op}_linear")(x, q, s, b)
    oracle = _oracle_w8 if op == "w8a16" else _oracle_w8a8
    assert rel_error(y, oracle(x, q, s, b)) < (_tolerance(isa, m) if op == "w8a16" else REL_TOL[torch.float32])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("group_size", [None, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_kernel(isa, m, group_size, symmetric):
    k, n = KN[(m + (group_size or 0)) % len(KN)]  # K=100/200/61: padded for every group size
    q, s, z, gs = quantize_int4(torch.randn(n, k), group_size, symmetric)
    x, b = torch.randn(m, k), torch.randn(n)
    with ops.use_cpu_isa(isa):
        y = ops.w4a16_linear(x, q, s, z, gs, b)
    assert rel_error(y, _oracle_w4(x, q, s, z, gs, b)) < _tolerance(isa, m)


BF16_ISAS = [isa for isa in ISAS if _bf16_rows(isa) is not None]


@pytest.mark.parametrize("isa", BF16_ISAS or [pytest.param("none", marks=pytest.mark.skip(
    reason="this CPU runs no level with bf16 products (AVX512-BF16)"))])
@pytest.mark.parametrize("m", [16, 17, 31, 33, 130])
@pytest.mark.parametrize("k", [1, 61, 200, 300])
def test_bf16_products_are_autocast_rounding_with_fp32_sums(isa, m, k):
    """From bf16_rows on, the weight-only kernels compute exactly x.bfloat16() @ W.bfloat16().t() with
    fp32 sums: W8A16 with the code in bf16 (exact) and the scale on the sum, W4A16 with the dequantized
    weight rounded to bf16. The float64 emulation then agrees to fp32 rounding, 100x tighter than the
    bf16 error itself; below bf16_rows, products stay fp32."""
    n = 70
    w, x, b = torch.randn(n, k), torch.randn(m, k) * 3, torch.randn(n)
    q, s = quantize_int8_per_channel(w)
    q4, s4, z4, gs = quantize_int4(w, 32 if k % 2 else 64, False)
    # the kernel's fp32 weight: fma(code, s, zs) with the layout's zs = -zero * s (exact in float64, one
    # rounding to float32), then bf16
    p4, g = cpu_int4(q4, s4, z4), torch.arange(k) // gs
    w4 = (unpack_int4(q4).double()[:, :k] * p4.s.double()[g, :n].t() + p4.zs.double()[g, :n].t()).float()
    xb = x.bfloat16().double()
    with ops.use_cpu_isa(isa):
        assert m >= ops.cpu_bf16_rows()
        y8 = ops.w8a16_linear(x, q, s, b)
        y4 = ops.w4a16_linear(x, q4, s4, z4, gs, b)
        y8_small = ops.w8a16_linear(x[:15], q, s, b)
    emu8 = (xb @ q.double().t()) * s.double() + b.double()
    emu4 = xb @ w4.bfloat16().double().t() + b.double()
    assert rel_error(y8, emu8) < 1e-5 and rel_error(y4, emu4) < 1e-5
    assert rel_error(y8, _oracle_w8(x, q, s, b)) > 1e-4  # the bf16 rounding of x is there
    assert rel_error(y8_small, _oracle_w8(x[:15], q, s, b)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("isa", ISAS)
def test_activation_quantization_is_exactly_the_reference(isa):
    x = torch.randn(37, 203) * torch.logspace(-3, 3, 37)[:, None]
    x[3] = 0.0  # a zero row: scale 0, codes 0
    x[5, 7] = 1e4  # an outlier
    x[9] = torch.arange(203) - 101.0  # exact .5 ties after scaling: round half to even
    xq, a = np.empty((37, 203), np.int8), np.empty(37, np.float32)
    with ops.use_cpu_isa(isa):
        extension().quantize_rows(x.numpy(), xq, a)
    rq, ra = reference.quantize_per_token(x)
    assert torch.equal(torch.from_numpy(xq), rq) and torch.equal(torch.from_numpy(a), ra)


@pytest.mark.parametrize("isa", ISAS)
def test_outliers_and_large_dynamic_range(isa):
    k, n = 300, 70
    w = torch.randn(n, k) * torch.logspace(-4, 2, k)
    q, s = quantize_int8_per_channel(w)
    x = torch.randn(19, k) * 1e3
    x[:, -3] = 3e4  # an outlier channel (meets large weights: the output is not all zero)
    b = torch.zeros(n)
    with ops.use_cpu_isa(isa):
        y16 = ops.w8a16_linear(x, q, s, b)
        y8 = ops.w8a8_linear(x, q, s, b)
    assert rel_error(y16, _oracle_w8(x, q, s, b)) < _tolerance(isa, 19)
    assert rel_error(y8, _oracle_w8a8(x, q, s, b)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("isa", ISAS)
def test_threads_give_identical_results(isa):
    q, s = quantize_int8_per_channel(torch.randn(300, 260))
    q4, s4, z4, gs = quantize_int4(torch.randn(300, 260), 64, False)
    x = torch.randn(40, 260)
    p8, pv, p4 = cpu_int8(q, s, 16), cpu_int8(q, s, 8), cpu_int4(q4, s4, z4)
    ext, outs = extension(), []
    with ops.use_cpu_isa(isa):
        for threads in (1, 2, 5):
            o = [np.empty((40, 300), np.float32) for _ in range(3)]
            ext.w8a16_gemm(x.numpy(), p8.panels.numpy(), p8.scales.numpy(), None, 300, o[0], threads)
            ext.w8a8_gemm(x.numpy(), pv.vnni.numpy(), pv.wsum.numpy(), pv.scales.numpy(), None, 300, o[1], threads)
            ext.w4a16_gemm(x.numpy(), p4.panels.numpy(), p4.s.numpy(), p4.zs.numpy(), gs, None, 300, o[2], threads)
            outs.append(o)
    for o in outs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(outs[0], o))


def test_thread_pool_and_openmp_give_identical_results():
    """The std::thread pool (the no-OpenMP fallback) and torch's OpenMP team split the same blocks."""
    ext = extension()
    q4, s4, z4, gs = quantize_int4(torch.randn(300, 260), 32, True)
    q, s = quantize_int8_per_channel(torch.randn(300, 260))
    x = torch.randn(33, 260)
    before, threads_before = ext.threading(), torch.get_num_threads()
    outs = {}
    try:
        for mode in ("pool", "openmp"):
            try:
                ext.set_threading(mode)
            except ValueError:  # built without OpenMP
                continue
            outs[mode] = [ops.w8a8_linear(x, q, s, None), ops.w4a16_linear(x, q4, s4, z4, gs, None)]
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                again = [ops.w8a8_linear(x, q, s, None), ops.w4a16_linear(x, q4, s4, z4, gs, None)]
                assert all(torch.equal(a, b) for a, b in zip(outs[mode], again))
    finally:
        torch.set_num_threads(threads_before)
        ext.set_threading(before)
    assert "pool" in outs
    if "openmp" in outs:
        assert all(torch.equal(a, b) for a, b in zip(outs["pool"], outs["openmp"]))
    with pytest.raises(ValueError, match="threading 'fibers'"):
        ext.set_threading("fibers")


def test_isa_levels_agree_closely():
    q, s = quantize_int8_per_channel(torch.randn(90, 150))
    x = torch.randn(20, 150)
    ys = []
    for isa in ISAS:
        with ops.use_cpu_isa(isa):
            ys.append(ops.w8a8_linear(x, q, s, None))
    for y in ys[1:]:  # identical integer sums; only the float epilogue may round differently
        assert torch.allclose(y, ys[0], rtol=1e-6, atol=1e-6)


def test_isa_selection_errors_and_restore():
    before = ops.cpu_isa()
    with pytest.raises(ValueError, match="'avx9000': unknown; expected one of scalar, avx2, avx512_vnni, avx512_bf16, "
                                         "amx_int8, amx_bf16"):
        ops.set_cpu_isa("avx9000")
    for isa in ("scalar", "avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"):
        if isa not in ISAS:
            with pytest.raises(ValueError, match="not supported by this CPU"):
                ops.set_cpu_isa(isa)
    with ops.use_cpu_isa("scalar"):
        assert ops.cpu_backend() == "cpp:scalar"
    assert ops.cpu_isa() == before


def test_the_highest_level_this_cpu_runs_is_chosen():
    """Unforced, dispatch picks the last of ISAS (the levels this CPU runs, in order) that is not opt-in:
    AMX-INT8 where the CPU has it and the OS grants tiles, else AVX-512 BF16, AVX-512 VNNI, AVX2, scalar.
    AMX-BF16 is offered where the CPU runs it but never chosen unforced."""
    best = [isa for isa in ISAS if isa != "amx_bf16"][-1]
    assert extension().best_isa() == best
    if not os.environ.get("QRUNTIME_CPU_ISA"):
        assert ops.cpu_backend() == f"cpp:{best}"


def test_forced_isa_environment(tmp_path):
    import subprocess
    import sys

    code = "import qruntime.ops.registry as o; print(o.cpu_backend())"
    env = {**__import__("os").environ, "QRUNTIME_CPU_ISA": "scalar"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "cpp:scalar"
    env["QRUNTIME_CPU_ISA"] = "avx9000"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "QRUNTIME_CPU_ISA='avx9000' ignored" in out.stderr and out.stdout.strip().startswith("cpp:")


# ---- CPU layouts -----------------------------------------------------------------------------------

@pytest.mark.parametrize("n,k", [(1, 1), (31, 7), (32, 64), (33, 100), (77, 576)])
def test_int8_layouts_round_trip(n, k):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    p = pack_int8_panels(q)
    assert p.shape == (-(-n // 32), k, 32) and torch.equal(unpack_int8_panels(p, n), q)
    assert torch.equal(p[0, min(3, k - 1), 0], q[0, min(3, k - 1)])
    v, wsum = pack_int8_vnni(q)
    assert v.shape == (-(-n // 32), -(-k // 4), 32, 4) and torch.equal(unpack_int8_vnni(v, n, k), q)
    assert torch.equal(wsum[:n], q.int().sum(1)) and not wsum[n:].any()
    if n > 1 and k > 5:  # byte order: p[b, s, j, i] = q[32 b + j, 4 s + i]
        assert v[0, 1, 1, 1] == q[1, 5]


@pytest.mark.parametrize("n,kp", [(1, 2), (31, 64), (33, 128), (70, 640)])
def test_int4_layout_round_trip(n, kp):
    q = torch.randint(0, 256, (n, kp // 2), dtype=torch.uint8)
    p = pack_int4_panels(q)
    assert p.shape == (-(-n // 32), kp, 16) and torch.equal(unpack_int4_panels(p, n), q)
    codes = unpack_int4(q)
    assert p[0, 1, 0] & 15 == codes[0, 1]
    if n > 16:
        assert p[0, 1, 0] >> 4 == codes[16, 1]


def test_cache_follows_in_place_changes_and_new_tensors():
    q, s = quantize_int8_per_channel(torch.randn(40, 64))
    x = torch.randn(3, 64)
    y1 = ops.w8a16_linear(x, q, s, None)
    q.neg_()  # in place: the version counter moves, the cached layout is rebuilt
    assert torch.allclose(ops.w8a16_linear(x, q, s, None), -y1, rtol=1e-6, atol=1e-6)
    s.mul_(2)
    assert torch.allclose(ops.w8a16_linear(x, q, s, None), -2 * y1, rtol=1e-6, atol=1e-5)
    del q
    gc.collect()
    q2, s2 = quantize_int8_per_channel(torch.randn(40, 64))
    assert rel_error(ops.w8a16_linear(x, q2, s2, None), _oracle_w8(x, q2, s2, torch.zeros(40))) < 1e-5


def test_empty_batch():
    q, s = quantize_int8_per_channel(torch.randn(8, 16))
    assert ops.w8a8_linear(torch.randn(0, 16), q, s, None).shape == (0, 8)


# ---- argument checks -------------------------------------------------------------------------------

class TestArgumentChecks:
    def setup_method(self):
        self.ext = extension()
        q, s = quantize_int8_per_channel(torch.randn(40, 24))
        self.p8, self.pv = cpu_int8(q, s, 16), cpu_int8(q, s, 8)
        q4, s4, z4, self.gs = quantize_int4(torch.randn(40, 24), None, False)
        self.p4 = cpu_int4(q4, s4, z4)
        self.x = np.random.randn(3, 24).astype(np.float32)
        self.out = np.empty((3, 40), np.float32)

    def test_wrong_dtype(self):
        with pytest.raises(TypeError, match="x: dtype float64, expected float32"):
            self.ext.w8a16_gemm(self.x.astype(np.float64), self.p8.panels.numpy(), self.p8.scales.numpy(), None, 40, self.out)
        with pytest.raises(TypeError, match="wp: dtype uint8, expected int8"):
            self.ext.w8a16_gemm(self.x, self.p4.panels.numpy(), self.p8.scales.numpy(), None, 40, self.out)
        with pytest.raises(TypeError, match="wsum: dtype"):
            self.ext.w8a8_gemm(self.x, self.pv.vnni.numpy(), self.pv.scales.numpy(), self.pv.scales.numpy(), None, 40, self.out)

    def test_non_contiguous(self):
        x = np.random.randn(3, 48).astype(np.float32)[:, ::2]
        with pytest.raises(ValueError, match="x: must be C-contiguous"):
            self.ext.w8a16_gemm(x, self.p8.panels.numpy(), self.p8.scales.numpy(), None, 40, self.out)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"out: shape \(3, 40\), dim 1 must be 41"):
            self.ext.w8a16_gemm(self.x, self.p8.panels.numpy(), self.p8.scales.numpy(), None, 41, self.out)
        with pytest.raises(ValueError, match=r"wp: shape \(2, 24, 32\), dim 1 must be 23"):
            self.ext.w8a16_gemm(self.x[:, :23].copy(), self.p8.panels.numpy(), self.p8.scales.numpy(), None, 40,
                                self.out)
        with pytest.raises(ValueError, match=r"bias: shape \(40,\), dim 0 must be 64"):
            self.ext.w8a8_gemm(self.x, self.pv.vnni.numpy(), self.pv.wsum.numpy(), self.pv.scales.numpy(),
                               np.zeros(40, np.float32), 40, self.out)
        with pytest.raises(ValueError, match="group_size=5: must divide the padded K=24"):
            self.ext.w4a16_gemm(self.x, self.p4.panels.numpy(), self.p4.s.numpy(), self.p4.zs.numpy(), 5, None, 40,
                                self.out)
        with pytest.raises(ValueError, match="x: K=30 does not match the padded K=24"):
            self.ext.w4a16_gemm(np.zeros((3, 30), np.float32), self.p4.panels.numpy(), self.p4.s.numpy(),
                                self.p4.zs.numpy(), self.gs, None, 40, self.out)
        with pytest.raises(ValueError, match="n=0: must be positive"):
            self.ext.w8a16_gemm(self.x, self.p8.panels.numpy(), self.p8.scales.numpy(), None, 0,
                                np.empty((3, 0), np.float32))

    def test_pad_channels_is_float32(self):
        assert pad_channels(torch.ones(33, dtype=torch.bfloat16)).dtype == torch.float32
