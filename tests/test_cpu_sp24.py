"""The C++ 2:4-sparse CPU kernel (``sp24_gemm``) on every ISA level this CPU can run, against the float64
reference; the sp24 CPU layout's round trip; the module fast path and its cache; the extension's argument
checks (Python exceptions with the values, never a crash)."""
import os

import numpy as np
import pytest
import torch
from conftest import REL_TOL, rel_error, require

from qruntime.ops import registry as ops
from qruntime.ops import reference
from qruntime.ops.extension import extension
from qruntime.formats.cpu_layout import cpu_sp24, unpack_cpu_sp24
from qruntime.formats.packing import nm_mask, pack_int4, pack_sp24, sp24_padded_k, sp24_positions

require(ops.SP24_CPU_KERNELS, "the C++ extension with its 2:4 kernel is not built",
        allowed="disabled by QRUNTIME_DISABLE_EXTENSION" if os.environ.get("QRUNTIME_DISABLE_EXTENSION", "") not in ("", "0") else None)
ISAS = ops.supported_cpu_isas() or ["none"]
MS = [1, 2, 3, 15, 16, 17, 128, 129]
KN = [(100, 77), (200, 33), (61, 130)]  # K, N: K padded (not a multiple of 8 / 32), N not a multiple of 32
# kept-value formats: float dtypes, INT8, INT4 with (group size, symmetric)
KINDS = ["fp32", "bf16", "fp16", "int8"] + [f"int4-g{g}-{'sym' if s else 'asym'}" for g in (None, 32, 64, 128)
                                            for s in (True, False)]


def make_sp24(n: int, k: int, kind: str, seed: int = 0):
    """Fresh random 2:4 tensors (values, meta, scales, zeros, group_size) of a layer [n, k]."""
    gen = torch.Generator().manual_seed(seed)
    group = None
    if kind.startswith("int4"):
        g = kind.split("-")[1][1:]
        group = None if g == "None" else int(g)
    kp = sp24_padded_k(k, group)
    w = torch.randn(n, k, generator=gen)
    w = w * nm_mask(torch.rand(n, k, generator=gen))
    w[0, :4] = 0.0  # a group with no nonzero: canonical positions 0, 1
    values, meta = pack_sp24(w, group)
    if kind in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
        return values.to(dtype), meta, None, None, 0
    if kind == "int8":
        q = torch.randint(-127, 128, (n, kp // 2), dtype=torch.int8, generator=gen)
        return q, meta, torch.rand(n, generator=gen) * 0.1 + 0.01, None, 0
    gs = group or kp
    codes = torch.randint(0, 16, (n, kp // 2), dtype=torch.uint8, generator=gen)
    scales = torch.rand(kp // gs, n, generator=gen) * 0.1 + 0.01
    zeros = None if kind.endswith("-sym") else torch.randint(0, 16, (kp // gs, n), dtype=torch.uint8, generator=gen)
    return pack_int4(codes), meta, scales, zeros, gs


def oracle(x, values, meta, scales, zeros, group_size, bias):
    """reference.sp24_linear on doubles."""
    return reference.sp24_linear(x.double(), values, meta, scales, zeros, group_size,
                                 None if bias is None else bias.double())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_sp24_kernel(isa, m, kind, xdtype):
    k, n = KN[(m + KINDS.index(kind)) % len(KN)]
    values, meta, scales, zeros, gs = make_sp24(n, k, kind, seed=m)
    x = torch.randn(m, k).to(xdtype)
    bias = torch.randn(n).to(xdtype) if m % 2 else None
    with ops.use_cpu_isa(isa):
        y = ops.sp24_linear(x, values, meta, scales, zeros, gs, bias)
    assert y.dtype == xdtype and y.shape == (m, n)
    assert rel_error(y, oracle(x, values, meta, scales, zeros, gs, bias)) < REL_TOL[xdtype]


@pytest.mark.parametrize("isa", ISAS)
def test_large_layer_and_every_path(isa):
    """K = 1000: many metadata words and INT4 runs; M around the direct / panel switch."""
    k, n = 1000, 70
    for kind in ("fp32", "int8", "int4-g128-asym"):
        values, meta, scales, zeros, gs = make_sp24(n, k, kind, seed=5)
        for m in (4, 5, 12, 13, 40):
            x = torch.randn(m, k)
            with ops.use_cpu_isa(isa):
                y = ops.sp24_linear(x, values, meta, scales, zeros, gs, None)
            assert rel_error(y, oracle(x, values, meta, scales, zeros, gs, None)) < REL_TOL[torch.float32], (kind, m)


@pytest.mark.parametrize("isa", ISAS)
def test_threads_give_identical_results(isa):
    values, meta, scales, zeros, gs = make_sp24(300, 260, "int4-g64-asym")
    lay = cpu_sp24(values, meta, scales, zeros, gs)
    x = torch.randn(40, 260).numpy()
    outs = []
    with ops.use_cpu_isa(isa):
        for threads in (1, 2, 5):
            for m in (1, 40):
                out = np.empty((m, 300), np.float32)
                extension().sp24_gemm(x[:m], lay.values.numpy(), lay.meta.numpy(), lay.s.numpy(), lay.zs.numpy(), gs,
                                      None, 300, out, threads)
                outs.append(out)
    assert all(np.array_equal(a, b) for a, b in zip(outs[:2] * 2, outs[2:]))


def test_isa_levels_agree_closely():
    values, meta, scales, zeros, gs = make_sp24(90, 150, "int8")
    x = torch.randn(3, 150)
    ys = []
    for isa in ISAS:
        with ops.use_cpu_isa(isa):
            ys.append(ops.sp24_linear(x, values, meta, scales, zeros, gs, None))
    # float32 sums in different orders: bounded relative to the norm of the output (a single output
    # that is a small difference of large terms can differ by more than 1e-5 of itself)
    for y in ys[1:]:
        assert (torch.linalg.vector_norm(y - ys[0]) / torch.linalg.vector_norm(ys[0])).item() < 1e-5


def test_int4_group_not_a_multiple_of_4_runs_the_reference():
    """INT4 groups of 2 columns (legal in the format, never produced by the quantizers) are not run by the
    C++ kernel, which reads whole groups of 4: the op falls back to the reference."""
    n, k = 40, 32
    _, meta = pack_sp24(torch.randn(n, k) * nm_mask(torch.rand(n, k)))
    values = pack_int4(torch.randint(0, 16, (n, k // 2), dtype=torch.uint8))
    scales = torch.rand(k // 2, n) + 0.1
    x = torch.randn(3, k)
    y = ops.sp24_linear(x, values, meta, scales, None, 2, None)
    assert rel_error(y, oracle(x, values, meta, scales, None, 2, None)) < REL_TOL[torch.float32]


def test_float64_activations_get_float64_math():
    values, meta, scales, zeros, gs = make_sp24(12, 32, "int8")
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    y = ops.sp24_linear(x, values, meta, scales, zeros, gs, bias)
    assert y.dtype == torch.float64 and rel_error(y, oracle(x, values, meta, scales, zeros, gs, bias)) < 1e-14
    torch.autograd.gradcheck(lambda x, b: ops.sp24_linear(x, values, meta, scales, zeros, gs, b), (x, bias))


def test_empty_batch():
    values, meta, scales, zeros, gs = make_sp24(8, 16, "fp32")
    assert ops.sp24_linear(torch.randn(0, 16), values, meta, scales, zeros, gs, None).shape == (0, 8)


# ---- the CPU layout --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fp32", "bf16", "fp16", "int8", "int4-gNone-asym", "int4-g32-sym"])
@pytest.mark.parametrize("n,k", [(1, 8), (31, 61), (32, 64), (33, 200), (77, 576)])
def test_layout_round_trip(kind, n, k):
    values, meta, scales, zeros, gs = make_sp24(n, k, kind, seed=n + k)
    lay = cpu_sp24(values, meta, scales, zeros, gs)
    kp, nb = meta.shape[1] * 8, -(-n // 32)
    assert lay.meta.shape == (nb, -(-kp // 32), 32) and lay.meta.dtype == torch.int32
    lanes = 16 if kind.startswith("int4") else 32
    assert lay.values.shape == (nb, kp // 4, 2, lanes)
    v2, m2 = unpack_cpu_sp24(lay)
    assert v2.dtype == values.dtype and torch.equal(v2, values) and torch.equal(m2, meta)
    # element order: v[b, g, s, j] = kept value 2 g + s of channel 32 b + j; position of slot s of group g
    # at bits 4 (g % 8) + 2 s of word g // 8
    j, g = n - 1, kp // 4 - 1
    pos = sp24_positions(meta)[j, 2 * g + 1] - 4 * g
    word = int(lay.meta[j // 32, g // 8, j % 32]) & 0xFFFFFFFF
    assert (word >> (4 * (g % 8) + 2)) & 3 == pos
    if not kind.startswith("int4"):
        assert lay.values[j // 32, g, 1, j % 32] == values[j, 2 * g + 1].to(lay.values.dtype)
    if n % 32:  # padding channels: zero values
        v = lay.values
        full = torch.cat((v & 15, v >> 4), dim=3) if kind.startswith("int4") else v
        assert not full[-1, :, :, 31].any()


# ---- the module fast path ----------------------------------------------------------------------------

class TinySparse(torch.nn.Module):
    """The attributes run_sp24_module reads (as SparseLinear has them)."""

    def __init__(self, n, k, kind):
        super().__init__()
        values, meta, scales, zeros, gs = make_sp24(n, k, kind)
        self.register_buffer("values", values)
        self.register_buffer("meta", meta)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.group_size, self.out_features = gs, n
        self.bias = torch.nn.Parameter(torch.randn(n), requires_grad=False)

    def reference(self, x):
        return oracle(x, self.values, self.meta, self.scales, self.zeros, self.group_size, self.bias)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4-g64-asym"])
def test_module_path_and_its_cache(kind):
    mod = TinySparse(45, 130, kind)
    x = torch.randn(5, 130)
    y = ops.run_sp24_module(mod, x)
    assert rel_error(y, mod.reference(x)) < REL_TOL[torch.float32]
    assert torch.equal(ops.run_sp24_module(mod, x), y)  # the kept plan
    with torch.no_grad():
        mod.bias.mul_(2)  # in place: the plan and the padded bias are rebuilt
        if mod.scales is not None:
            mod.scales.mul_(3)
        else:
            mod.values.neg_()
    y2 = ops.run_sp24_module(mod, x)
    assert rel_error(y2, mod.reference(x)) < REL_TOL[torch.float32]
    mod.values = make_sp24(45, 130, kind, seed=9)[0]  # a new tensor
    assert rel_error(ops.run_sp24_module(mod, x), mod.reference(x)) < REL_TOL[torch.float32]
    with pytest.raises(TypeError, match="x: dtype torch.int32"):
        ops.run_sp24_module(mod, torch.ones(2, 130, dtype=torch.int32))


def test_op_cache_follows_in_place_changes():
    values, meta, scales, zeros, gs = make_sp24(40, 64, "fp32")
    x = torch.randn(3, 64)
    y1 = ops.sp24_linear(x, values, meta, scales, zeros, gs, None)
    values.neg_()
    assert torch.allclose(ops.sp24_linear(x, values, meta, scales, zeros, gs, None), -y1, rtol=1e-6, atol=1e-6)
    meta.copy_(make_sp24(40, 64, "fp32", seed=1)[1])  # other positions, same tensor
    y3 = ops.sp24_linear(x, values, meta, scales, zeros, gs, None)
    assert rel_error(y3, oracle(x, values, meta, scales, zeros, gs, None)) < REL_TOL[torch.float32]


# ---- argument checks -------------------------------------------------------------------------------

class TestArgumentChecks:
    def setup_method(self):
        self.ext = extension()
        self.f = cpu_sp24(*make_sp24(40, 24, "fp32"))
        self.q8 = cpu_sp24(*make_sp24(40, 24, "int8"))
        self.q4 = cpu_sp24(*make_sp24(40, 24, "int4-gNone-asym"))
        self.x = np.random.randn(3, 24).astype(np.float32)
        self.out = np.empty((3, 40), np.float32)

    def call(self, lay, x=None, values=None, meta=None, s="same", zs="same", group=None, bias=None, n=40, out=None):
        self.ext.sp24_gemm(self.x if x is None else x, lay.values.numpy() if values is None else values,
                           lay.meta.numpy() if meta is None else meta,
                           (None if lay.s is None else lay.s.numpy()) if isinstance(s, str) else s,
                           (None if lay.zs is None else lay.zs.numpy()) if isinstance(zs, str) else zs,
                           lay.group_size if group is None else group, bias, n, self.out if out is None else out)

    def test_valid_calls(self):
        for lay in (self.f, self.q8, self.q4):
            self.call(lay)

    def test_wrong_dtype(self):
        with pytest.raises(TypeError, match="x: dtype float64, expected float32"):
            self.call(self.f, x=self.x.astype(np.float64))
        with pytest.raises(TypeError, match="values: dtype float64, expected float32, int16"):
            self.call(self.f, values=self.f.values.numpy().astype(np.float64))
        with pytest.raises(TypeError, match="meta: dtype uint8, expected int32"):
            self.call(self.f, meta=self.f.meta.numpy().view(np.uint8))
        with pytest.raises(TypeError, match="scales: dtype float64, expected float32"):
            self.call(self.q8, s=self.q8.s.numpy().astype(np.float64))
        with pytest.raises(TypeError, match=r"meta: dtype torch.int8, shape \(40, 3\); expected uint8"):
            ops.sp24_linear(torch.randn(2, 24), *make_sp24(40, 24, "fp32")[:1], torch.zeros(40, 3, dtype=torch.int8),
                            None, None, 0, None)

    def test_non_contiguous(self):
        x = np.random.randn(3, 48).astype(np.float32)[:, ::2]
        with pytest.raises(ValueError, match="x: must be C-contiguous"):
            self.call(self.f, x=x)
        v = np.ascontiguousarray(np.swapaxes(self.f.values.numpy(), 0, 3))
        with pytest.raises(ValueError, match="values: must be C-contiguous"):
            self.call(self.f, values=np.swapaxes(v, 0, 3))

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"out: shape \(3, 40\), dim 1 must be 41"):
            self.call(self.f, n=41)
        with pytest.raises(ValueError, match=r"values: shape \(2, 6, 2, 32\), dim 0 must be 3"):
            self.call(self.f, n=70, out=np.empty((3, 70), np.float32))
        with pytest.raises(ValueError, match="x: K=30 exceeds the padded K=24"):
            self.call(self.f, x=np.zeros((3, 30), np.float32))
        with pytest.raises(ValueError, match=r"meta: shape \(2, 1, 16\), dim 2 must be 32"):
            self.call(self.f, meta=np.zeros((2, 1, 16), np.int32))
        with pytest.raises(ValueError, match=r"values: shape \(2, 6, 2, 32\), dim 3 must be 16"):
            self.call(self.q4, values=np.zeros((2, 6, 2, 32), np.uint8))
        with pytest.raises(ValueError, match="group_size=6: must be a multiple of 4 that divides the padded K=24"):
            self.call(self.q4, group=6)
        with pytest.raises(ValueError, match="scales: None; INT8 values need scales"):
            self.call(self.q8, s=None)
        with pytest.raises(ValueError, match="scales/zs given with float values"):
            self.call(self.f, s=np.ones(64, np.float32))
        with pytest.raises(ValueError, match=r"zs: shape \(1, 64\), dim 0 must be 2"):
            self.call(self.q4, group=12, s=np.ones((2, 64), np.float32))
        with pytest.raises(ValueError, match=r"bias: shape \(40,\), dim 0 must be 64"):
            self.call(self.f, bias=np.zeros(40, np.float32))
        with pytest.raises(ValueError, match="n=0: must be positive"):
            self.call(self.f, n=0, out=np.empty((3, 0), np.float32))
        with pytest.raises(ValueError, match=r"x: K=30 does not match the 2:4 tensors' padded K=24"):
            ops.sp24_linear(torch.randn(2, 30), *make_sp24(40, 24, "fp32"), None)
