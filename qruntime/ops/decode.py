"""One decoding step's work between the GEMMs (a single new token): the residual add with the next norm,
the MLP activation, and one token's rotary, KV-cache write and attention.

Two implementations with one signature, over numpy float32 buffers that the caller owns and reuses
(a step allocates nothing): the C++ extension's (``add_rms_norm``, ``add_layer_norm``, ``act_mul``,
``attend``; csrc/cpu/decode_impl.h) and the float64 PyTorch reference below, which the tests compare it
with and which runs where the extension is not built. :func:`step_ops` returns the one to use.

Layouts (kernels.h, ``AttendArgs``): ``qkv`` holds the token's q | k | v projections
[(heads + 2 kv_heads) * head_dim]; ``k_cache`` is [kv_heads, head_dim, capacity] (keys transposed),
``v_cache`` [kv_heads, capacity, head_dim]; ``cos`` / ``sin`` are the position's [head_dim / 2] rotary
factors (rotate-half convention), or None for no rotary.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from .extension import extension

__all__ = ["ACT_SILU_MUL", "ACT_GELU_TANH", "ACT_GELU", "ACT_GELU_TANH_MUL", "GATED", "step_ops", "reference_ops"]

ACT_SILU_MUL, ACT_GELU_TANH, ACT_GELU, ACT_GELU_TANH_MUL = 0, 1, 2, 3
GATED = (ACT_SILU_MUL, ACT_GELU_TANH_MUL)  # act(g[:n]) * g[n:2n]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).reshape(-1).to(torch.float64)


def _write(out: np.ndarray, value: torch.Tensor) -> None:
    out.reshape(-1)[:] = value.reshape(-1).to(torch.float32).numpy()


def add_rms_norm(h, r, w, eps, x) -> None:
    """h += r (r may be None); x = h / sqrt(mean(h^2) + eps) * w."""
    hv = _t(h) + (0 if r is None else _t(r))
    _write(h, hv)
    hv = _t(h)
    _write(x, hv / torch.sqrt(hv.square().mean() + eps) * _t(w))


def add_layer_norm(h, r, w, b, eps, x) -> None:
    """h += r (r may be None); x = (h - mean) / sqrt(var + eps) * w + b (b may be None)."""
    hv = _t(h) + (0 if r is None else _t(r))
    _write(h, hv)
    hv = _t(h)
    y = (hv - hv.mean()) / torch.sqrt(hv.var(unbiased=False) + eps) * _t(w)
    _write(x, y if b is None else y + _t(b))


def act_mul(g, act, y) -> None:
    """act 0: y = silu(g[:n]) * g[n:2n]; 1: y = gelu_tanh(g); 2: y = gelu (erf); 3: y = gelu_tanh(g[:n]) *
    g[n:2n]; n = y's size."""
    n, gv = y.size, _t(g)
    if act == ACT_SILU_MUL:
        value = torch.nn.functional.silu(gv[:n]) * gv[n:]
    elif act == ACT_GELU_TANH_MUL:
        value = torch.nn.functional.gelu(gv[:n], approximate="tanh") * gv[n:]
    elif act in (ACT_GELU_TANH, ACT_GELU):
        value = torch.nn.functional.gelu(gv, approximate="tanh" if act == ACT_GELU_TANH else "none")
    else:
        raise ValueError(f"act={act}: expected 0 (silu-gated), 1 (gelu_tanh), 2 (gelu) or 3 (gelu_tanh-gated)")
    _write(y, value)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [heads, hd] rotated by cos / sin [hd / 2] (rotate-half)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _head_norm(x: torch.Tensor, w, eps: float) -> torch.Tensor:
    return x if w is None else x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * _t(w)


def attend(qkv, heads, kv_heads, k_cache, v_cache, cos, sin, pos, scale, out, threads, q_norm=None, k_norm=None,
           norm_eps=0.0) -> None:
    """One token's attention at position ``pos``: normalizes each head of q / k by ``q_norm`` / ``k_norm``
    (RMS over head_dim, when given) and rotates q and k (when cos is given), in ``qkv``; writes k and v
    into the caches at ``pos``, and softmax(scale q.k) v over positions 0..pos to ``out``. ``threads`` is
    accepted for the signature and unused."""
    hd = k_cache.shape[1]
    v = _t(qkv)
    q, k, vv = v[: heads * hd].view(heads, hd), v[heads * hd: (heads + kv_heads) * hd].view(kv_heads, hd), v[(heads + kv_heads) * hd:]
    q, k = _head_norm(q, q_norm, norm_eps), _head_norm(k, k_norm, norm_eps)
    if cos is not None:
        q, k = _rotate(q, _t(cos), _t(sin)), _rotate(k, _t(cos), _t(sin))
    if cos is not None or q_norm is not None or k_norm is not None:
        _write(qkv[..., : (heads + kv_heads) * hd], torch.cat([q.reshape(-1), k.reshape(-1)]))
    k_cache[:, :, pos] = k.to(torch.float32).numpy()
    v_cache[:, pos, :] = vv.view(kv_heads, hd).to(torch.float32).numpy()
    keys = torch.from_numpy(k_cache[:, :, : pos + 1]).to(torch.float64)   # [kv, hd, T]
    values = torch.from_numpy(v_cache[:, : pos + 1]).to(torch.float64)   # [kv, T, hd]
    group = heads // kv_heads
    scores = torch.einsum("hd,hdt->ht", q, keys.repeat_interleave(group, 0)) * scale
    _write(out, torch.einsum("ht,htd->hd", scores.softmax(-1), values.repeat_interleave(group, 0)))


reference_ops = SimpleNamespace(add_rms_norm=add_rms_norm, add_layer_norm=add_layer_norm, act_mul=act_mul, attend=attend)


def step_ops():
    """The C++ extension where it is built (it has the decode-step functions), else :data:`reference_ops`."""
    ext = extension()
    return ext if ext is not None and hasattr(ext, "attend") else reference_ops


