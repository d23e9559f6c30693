"""Property-based tests (hypothesis): every op on every backend this machine has, on drawn problems.

Backends: the PyTorch reference in the activation dtype, each C++ ISA level this CPU runs (forced), and
the Triton kernels (in the interpreter without a GPU, any path). Problems: M, K, N from 1, primes and
tile edges +-1 up to a few hundred; every INT4 group size and symmetry; fp32 / fp16 / bf16 activations
laid out contiguous, at a storage offset inside a wider buffer, or column-major; rows spanning four
orders of magnitude, outlier channels in activations and weights, sometimes an all-zero row.

The bound (the standard one for a rounded dot product, robust to cancellation: with N = 1 an output can
be a small difference of large terms) is ``||y - y_oracle|| <= REL_TOL[dtype] * || |x| @ |W|^T + |bias| ||``, with
the float64 oracle of tests/conftest.py and W the dequantized weight (for W8A8, x is the dequantized
per-token activation ``xq * a``).

Example counts are sized for CI (fixed examples, ``derandomize``); ``QRUNTIME_HYPOTHESIS=deep`` runs 20x
as many, freshly drawn each run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REL_TOL, scaled_error, w4a16_oracle, w8a8_activations, w8a8_oracle, w8a16_oracle
from qruntime.ops import registry as ops
from qruntime.ops import reference
from qruntime.formats.packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8_per_channel

DEEP = os.environ.get("QRUNTIME_HYPOTHESIS", "ci") == "deep"
SCALE = 20 if DEEP else 1


def examples(n: int):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=not DEEP, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


try:
    import triton  # noqa: F401

    from qruntime.kernels import _common as triton_common
    INTERPRETING = triton_common.interpreting()
except ImportError:
    INTERPRETING = False

# "triton": the kernels in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest.py
# without a GPU); "triton:cuda": compiled, on the GPU (marked gpu: scripts/gpu_check.sh runs it)
BACKENDS = (["reference"] + [f"cpp:{isa}" for isa in ops.supported_cpu_isas()] + (["triton"] if INTERPRETING else [])
            + [pytest.param("triton:cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not torch.cuda.is_available() or INTERPRETING, reason="needs an NVIDIA GPU (and TRITON_INTERPRET off)")])])
EDGES = (1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129, 191, 257)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "offset", "column-major")


def dims(limit: int):
    return st.one_of(st.sampled_from([d for d in EDGES if d <= limit]), st.integers(1, limit))


@dataclass
class Problem:
    m: int
    k: int
    n: int
    dtype: torch.dtype
    layout: str
    seed: int
    zero_row: bool
    bias: bool


@st.composite
def problems(draw, max_m, max_k, max_n):
    return Problem(draw(dims(max_m)), draw(dims(max_k)), draw(dims(max_n)), draw(st.sampled_from(DTYPES)),
                   draw(st.sampled_from(LAYOUTS)), draw(st.integers(0, 2**31 - 1)),
                   draw(st.booleans()), draw(st.booleans()))


def _device(backend: str) -> str:
    return "cuda" if backend == "triton:cuda" else "cpu"


def make_inputs(p: Problem, device: str = "cpu"):
    """(x [M, K] in p.layout, weight [N, K] float32, bias [N] or None), all finite, never all zero."""
    g = torch.Generator().manual_seed(p.seed)
    rows = 10 ** (torch.rand(p.m, 1, generator=g) * 3.5 - 2)  # 1e-2 .. 3e1 per row
    x = torch.randn(p.m, p.k, generator=g) * rows
    x[:, torch.randperm(p.k, generator=g)[: max(1, p.k // 50)]] *= 16  # outlier channels
    if p.zero_row and p.m > 1:
        x[torch.randint(0, p.m, (1,), generator=g)] = 0
    w = torch.randn(p.n, p.k, generator=g) * 0.05
    w[:, torch.randperm(p.k, generator=g)[: max(1, p.k // 64)]] *= 8
    bias = torch.randn(p.n, generator=g).to(p.dtype) if p.bias else None
    x = x.to(p.dtype)
    if p.layout == "offset":  # a column window of a wider buffer: row stride > K, storage offset > 0
        wide = torch.randn(p.m, p.k + 7, generator=g).to(p.dtype)
        wide[:, 3 : 3 + p.k] = x
        x = wide[:, 3 : 3 + p.k]
    elif p.layout == "column-major":
        x = x.t().contiguous().t()
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return to(x), w, to(bias)


def run(backend: str, op: str, args: tuple, path: str | None = None):
    if backend == "reference":
        return getattr(reference, op)(*args)
    if backend.startswith("cpp:"):
        with ops.use_cpu_isa(backend[4:]):
            return getattr(ops, {"w8a16_linear": "cpu_w8a16", "w8a8_linear": "cpu_w8a8", "w4a16_linear": "cpu_w4a16"}[op])(*args)
    from qruntime.ops import triton_backend

    module = triton_backend.load(op.split("_")[0])
    return getattr(module, op)(*args, path=path)


def _tolerance(backend, op, p):
    """REL_TOL of the input dtype; a C++ level's weight-only kernels with bf16 products (from
    ops.cpu_bf16_rows() rows on) are held to bf16's."""
    dtype = p.dtype
    if backend.startswith("cpp:") and op != "w8a8_linear":
        with ops.use_cpu_isa(backend[4:]):
            rows = ops.cpu_bf16_rows()
        if rows is not None and p.m >= rows:
            dtype = torch.bfloat16
    return REL_TOL[dtype]


def _limits(backend):
    # the interpreter runs NumPy per tile: smaller problems keep the suite inside its time budget
    return (40, 300, 160) if backend == "triton" else (200, 700, 300)


def _path(data, backend, op):
    if not backend.startswith("triton"):
        return None
    return data.draw(st.sampled_from(["splitk", "gemm"] + ([] if op == "w8a8_linear" else ["dequant"])), label="path")


def _count(backend):
    return 15 if backend.startswith("triton") else 40


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["w8a16_linear", "w8a8_linear"])
def test_int8_ops(backend, op):
    @examples(_count(backend))
    @given(data=st.data())
    def check(data):
        p = data.draw(problems(*_limits(backend)), label="problem")
        device = _device(backend)
        x, w, bias = make_inputs(p, device)
        qweight, scales = (t.to(device) for t in quantize_int8_per_channel(w))
        y = run(backend, op, (x, qweight, scales, bias), _path(data, backend, op))
        assert y.dtype == p.dtype and y.shape == (p.m, p.n)
        w_deq = dequantize_int8(qweight.cpu(), scales.cpu())
        if op == "w8a16_linear":
            oracle, x_eff = w8a16_oracle(x, qweight, scales, bias), x
        else:
            oracle, x_eff = w8a8_oracle(x, qweight, scales, bias), w8a8_activations(x)
        assert scaled_error(y, oracle, x_eff, w_deq, bias) < _tolerance(backend, op, p), p

    check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_w4a16(backend):
    @examples(_count(backend) * 2)
    @given(data=st.data())
    def check(data):
        p = data.draw(problems(*_limits(backend)), label="problem")
        group = data.draw(st.sampled_from([None, 16, 32, 64, 128]), label="group_size")
        symmetric = data.draw(st.booleans(), label="symmetric")
        device = _device(backend)
        x, w, bias = make_inputs(p, device)
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        qweight, scales, zeros, gs = quantize_int4(w, group, symmetric)
        args = (x, to(qweight), to(scales), to(zeros), gs, bias)
        y = run(backend, "w4a16_linear", args, _path(data, backend, "w4a16_linear"))
        assert y.dtype == p.dtype and y.shape == (p.m, p.n)
        w_deq = dequantize_int4(qweight, scales, zeros, gs, p.k)
        assert scaled_error(y, w4a16_oracle(*args), x, w_deq, bias) < _tolerance(backend, "w4a16_linear", p), \
            (p, group, symmetric)

    check()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_per_token_codes_are_the_reference_codes(backend):
    """The activation quantizer of every backend gives the reference's codes bit for bit (through the
    W8A8 output with an identity weight: y = a * xq exactly when K = N and W = I)."""
    @examples(_count(backend))
    @given(data=st.data())
    def check(data):
        p = data.draw(problems(24, 96, 1), label="problem")
        device = _device(backend)
        x, _, _ = make_inputs(Problem(p.m, p.k, p.k, torch.float32, p.layout, p.seed, p.zero_row, False), device)
        eye, ones = torch.eye(p.k, dtype=torch.int8, device=device), torch.ones(p.k, device=device)
        y = run(backend, "w8a8_linear", (x, eye, ones, None), _path(data, backend, "w8a8_linear"))
        xq, a = reference.quantize_per_token(x.cpu())
        assert torch.equal(y.cpu(), xq.float() * a[:, None]), p

    check()
