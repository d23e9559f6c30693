"""The decode-step kernels (add_rms_norm, add_layer_norm, act_mul, attend) on every ISA level this CPU runs,
against their float64 PyTorch references (qruntime.ops.decode), fresh random inputs each; and their
argument checks (Python exceptions naming the values)."""
import os

import numpy as np
import pytest

from conftest import require
from qruntime.ops import registry as ops
from qruntime.ops.decode import ACT_GELU, ACT_GELU_TANH, ACT_GELU_TANH_MUL, ACT_SILU_MUL, GATED, reference_ops as ref
from qruntime.ops.extension import extension

require(extension() is not None, "the C++ extension qruntime.ops._C is not built",
        allowed="disabled by QRUNTIME_DISABLE_EXTENSION" if os.environ.get("QRUNTIME_DISABLE_EXTENSION", "") not in ("", "0") else None)
ISAS = ops.supported_cpu_isas() or ["none"]
TOL = 2e-6  # relative to the output's largest value: float32 sums of a few hundred terms


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _close(got, want, tol=TOL):
    err = float(np.abs(got.astype(np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
    assert err < tol, f"relative error {err:.3g} >= {tol:g}"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n", [1, 17, 576])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norms_match_the_reference(isa, n, with_residual):
    rng = np.random.default_rng()
    h, r, w, b = _rand(rng, 1, n, scale=30), _rand(rng, 1, n), _rand(rng, n), _rand(rng, n)
    res = r if with_residual else None
    for name, args in (("add_rms_norm", (w, 1e-5)), ("add_layer_norm", (w, b, 1e-5))):
        h1, h2, x1, x2 = h.copy(), h.copy(), np.empty_like(h), np.empty_like(h)
        with ops.use_cpu_isa(isa):
            getattr(extension(), name)(h1, res, *args, x1)
        getattr(ref, name)(h2, res, *args, x2)
        _close(h1, h2.astype(np.float64))
        _close(x1, x2.astype(np.float64), 1e-5 if n > 1 and name == "add_layer_norm" else TOL)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("act", [ACT_SILU_MUL, ACT_GELU_TANH, ACT_GELU, ACT_GELU_TANH_MUL])
def test_activations_match_the_reference(isa, act):
    rng = np.random.default_rng()
    n = 1536
    g = _rand(rng, 1, 2 * n if act in GATED else n, scale=4)
    y1, y2 = np.empty((1, n), np.float32), np.empty((1, n), np.float32)
    with ops.use_cpu_isa(isa):
        extension().act_mul(g, act, y1)
    ref.act_mul(g, act, y2)
    _close(y1, y2.astype(np.float64), 1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("heads,kv_heads,hd", [(9, 3, 64), (4, 4, 16), (2, 1, 6)])
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_attend_matches_the_reference(isa, heads, kv_heads, hd, rotary, qk_norm):
    rng = np.random.default_rng()
    cap = 300
    kc, vc = _rand(rng, kv_heads, hd, cap), _rand(rng, kv_heads, cap, hd)
    kc2, vc2 = kc.copy(), vc.copy()
    for pos in (0, 1, 130, cap - 1):  # one thread below 2^16 multiply-adds, the caller's threads above
        qkv = _rand(rng, 1, (heads + 2 * kv_heads) * hd, scale=2)
        qkv2 = qkv.copy()
        ang = _rand(rng, hd // 2, scale=3)
        cos, sin = (np.cos(ang), np.sin(ang)) if rotary else (None, None)
        o1, o2 = np.empty((1, heads * hd), np.float32), np.empty((1, heads * hd), np.float32)
        norms = (_rand(rng, hd), _rand(rng, hd), 1e-6) if qk_norm else (None, None, 0.0)
        with ops.use_cpu_isa(isa):
            extension().attend(qkv, heads, kv_heads, kc, vc, cos, sin, pos, hd ** -0.5, o1, 2, *norms)
        ref.attend(qkv2, heads, kv_heads, kc2, vc2, cos, sin, pos, hd ** -0.5, o2, 2, *norms)
        _close(qkv, qkv2.astype(np.float64))  # the rotated q and k, left in place
        _close(kc[:, :, pos], kc2[:, :, pos].astype(np.float64))
        assert np.array_equal(vc, vc2)
        _close(o1, o2.astype(np.float64), 1e-5)


def test_attend_results_do_not_depend_on_threads():
    rng = np.random.default_rng()
    kc, vc = _rand(rng, 2, 64, 1024), _rand(rng, 2, 1024, 64)
    qkv = _rand(rng, 1, 8 * 64)
    outs = []
    for threads in (1, 2, 3):
        o = np.empty((1, 4 * 64), np.float32)
        extension().attend(qkv.copy(), 4, 2, kc, vc, None, None, 1000, 0.125, o, threads)
        outs.append(o)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_argument_errors_name_the_values():
    ext = extension()
    h = np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match=r"w: shape \(7,\) holds 7 values, expected 8"):
        ext.add_rms_norm(h, None, np.ones(7, np.float32), 1e-5, h.copy())
    with pytest.raises(TypeError, match="h: dtype float64, expected float32"):
        ext.add_rms_norm(h.astype(np.float64), None, np.ones(8, np.float32), 1e-5, h.copy())
    with pytest.raises(ValueError, match="act=5: expected 0 .*3"):
        ext.act_mul(h, 5, h.copy())
    with pytest.raises(ValueError, match="g: shape .* expected 16"):
        ext.act_mul(h, ACT_SILU_MUL, h.copy())
    kc, vc = np.zeros((2, 4, 10), np.float32), np.zeros((2, 10, 4), np.float32)
    qkv, out = np.zeros((1, 16), np.float32), np.zeros((1, 8), np.float32)
    with pytest.raises(ValueError, match="pos=10: outside the cache's 10 positions"):
        ext.attend(qkv, 2, 2, kc, vc, None, None, 10, 0.5, out, 1)
    with pytest.raises(ValueError, match="heads=3, kv_heads=2"):
        ext.attend(qkv, 3, 2, kc, vc, None, None, 0, 0.5, out, 1)
    with pytest.raises(ValueError, match="cos and sin"):
        ext.attend(qkv, 2, 2, kc, vc, np.ones(2, np.float32), None, 0, 0.5, out, 1)
    with pytest.raises(ValueError, match=r"q_norm: shape \(3,\) holds 3 values, expected 4"):
        ext.attend(np.zeros((1, 24), np.float32), 2, 2, kc, vc, None, None, 0, 0.5, out, 1, np.ones(3, np.float32), None, 1e-6)
    with pytest.raises(ValueError, match="v_cache: shape"):
        ext.attend(qkv, 2, 2, kc, np.zeros((2, 9, 4), np.float32), None, None, 0, 0.5, out, 1)
    with pytest.raises(ValueError, match="must be writable"):
        ro = kc.copy()
        ro.setflags(write=False)
        ext.attend(qkv, 2, 2, ro, vc, None, None, 0, 0.5, out, 1)
