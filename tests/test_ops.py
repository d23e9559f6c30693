"""Every op, on every backend this machine has, against a float64 oracle on fresh random inputs."""
import pytest
import torch

from conftest import REL_TOL, rel_error, scaled_error, w8a8_activations, weight_only_tol
from conftest import w4a16_oracle as _w4_oracle
from conftest import w8a8_oracle as _w8a8_oracle
from conftest import w8a16_oracle as _w8_oracle
from qruntime.ops import registry as ops
from qruntime.ops import reference
from qruntime.ops.extension import extension
from qruntime.formats.packing import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8_per_channel

BACKENDS = ["dispatch", "reference"]  # dispatch = whatever torch.ops picks on this device (C++ on CPU)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 64, 33), (3, 100, 1), (17, 576, 192), (118, 96, 40)]  # (M, K, N): ragged on purpose


def _run(backend, fn_name, *args):
    fn = getattr(ops if backend == "dispatch" else reference, fn_name)
    return fn(*args)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("group_size", [None, 16, 32, 64, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_w4a16_linear(backend, dtype, m, k, n, group_size, symmetric):
    qweight, scales, zeros, gs = quantize_int4(torch.randn(n, k), group_size, symmetric)
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = _run(backend, "w4a16_linear", x, qweight, scales, zeros, gs, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    w = dequantize_int4(qweight, scales, zeros, gs, k)
    tol = weight_only_tol(dtype, m) if backend == "dispatch" else REL_TOL[dtype]
    assert scaled_error(y, _w4_oracle(x, qweight, scales, zeros, gs, bias), x, w, bias) < tol


def test_cpu_backend_names_the_path():
    ext = extension()
    assert ops.cpu_backend() == ("reference" if ext is None else f"cpp:{ext.isa()}")



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("op", ["w8a16_linear", "w8a8_linear"])
def test_int8_linear(op, backend, dtype, m, k, n, with_bias):
    qweight, scales = quantize_int8_per_channel(torch.randn(n, k))
    x = torch.randn(m, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = _run(backend, op, x, qweight, scales, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    w = dequantize_int8(qweight, scales)
    if op == "w8a16_linear":
        oracle, x_eff = _w8_oracle(x, qweight, scales, bias), x
    else:
        oracle, x_eff = _w8a8_oracle(x, qweight, scales, bias), w8a8_activations(x)
    tol = weight_only_tol(dtype, m) if backend == "dispatch" and op == "w8a16_linear" else REL_TOL[dtype]
    assert scaled_error(y, oracle, x_eff, w, bias) < tol
    if op == "w8a8_linear" and n >= 32:  # over many outputs, close to the float product (~0.6% error)
        assert rel_error(y, _w8_oracle(x, qweight, scales, bias)) < 0.03


@pytest.mark.parametrize("symmetric", [True, False])
def test_opcheck(symmetric):
    qweight, scales = quantize_int8_per_channel(torch.randn(24, 40))
    x = torch.randn(5, 40, requires_grad=True)
    torch.library.opcheck(ops.w8a16_linear, (x, qweight, scales, torch.randn(24)))
    torch.library.opcheck(ops.w8a8_linear, (x, qweight, scales, torch.randn(24)))
    q4, s4, z4, gs = quantize_int4(torch.randn(24, 40), 16, symmetric)
    torch.library.opcheck(ops.w4a16_linear, (x, q4, s4, z4, gs, torch.randn(24)))


def test_gradients_match_dense():
    qweight, scales = quantize_int8_per_channel(torch.randn(12, 20))
    x = torch.randn(4, 20, dtype=torch.float32, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    ops.w8a16_linear(x, qweight, scales, bias).square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, qweight.float() * scales[:, None], b2).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


def test_op_shape_errors_name_the_values():
    qweight, scales = quantize_int8_per_channel(torch.randn(8, 16))
    with pytest.raises(ValueError, match="K=15"):
        ops.w8a16_linear(torch.randn(2, 15), qweight, scales, None)
    with pytest.raises(ValueError, match=r"scales: shape \(7,\)"):
        ops.w8a16_linear(torch.randn(2, 16), qweight, scales[:7], None)
    with pytest.raises(TypeError, match="int8"):
        ops.w8a16_linear(torch.randn(2, 16), qweight.to(torch.int16), scales, None)
    q4, s4, z4, gs = quantize_int4(torch.randn(8, 64), 32, False)
    with pytest.raises(ValueError, match="group_size=48"):
        ops.w4a16_linear(torch.randn(2, 64), q4, s4, z4, 48, None)
    with pytest.raises(ValueError, match="K=20"):
        ops.w4a16_linear(torch.randn(2, 20), q4, s4, z4, gs, None)
