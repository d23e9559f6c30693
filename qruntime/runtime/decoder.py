"""The decoder: a KV cache, prefill over M tokens and decoding steps of one token, and greedy generation.

Prefill runs PyTorch ops and the modules' own forwards (the GEMM kernels at M rows). A decoding step runs
a plan built once: for each block, the norm (with the residual add), the fused q/k/v kernel, one token's
attention (rotary, cache write, softmax) in C++, the output projection, the next norm, the fused gate/up
kernel, the activation and the down projection, each a direct call on preallocated float32 buffers
(:mod:`qruntime.ops.decode`). Outputs match the model's own forward to float32 rounding (tests compare
logits with Hugging Face's at every step, per family and format).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qruntime.ops.decode import ACT_GELU_TANH, ACT_SILU_MUL, GATED, step_ops
from .architecture import Architecture, Norm, UnsupportedModelError, read_architecture
from .projection import Projection

__all__ = ["Decoder", "Sampler", "generate", "eos_ids"]


@dataclass
class _Buffers:
    """One token's activations, shared by every block (numpy float32 rows [1, n])."""

    h: np.ndarray
    x: np.ndarray
    qkv: np.ndarray
    att: np.ndarray
    r: np.ndarray
    g: np.ndarray
    a: np.ndarray
    logits: np.ndarray


def _row(n: int) -> np.ndarray:
    return np.zeros((1, n), dtype=np.float32)


class Decoder:
    """Generation with a Hugging Face causal LM (compressed by qruntime or not) on the CPU.

    >>> dec = Decoder(model)
    >>> ids = dec.generate(prompt_ids, max_new_tokens=64)   # [1, P + new], as model.generate(do_sample=False)
    >>> ids = dec.generate(prompt_ids, 64, do_sample=True, top_p=0.9, generator=torch.Generator().manual_seed(0))

    ``prefill(ids)`` and ``step(token)`` give the logits to drive other sampling; ``reset()`` starts a
    new sequence. The decoder reads the model's modules (it keeps no copy of them, except the fused
    q/k/v and gate/up projections: pass ``fuse=False`` to run them apart and store nothing extra); a
    change to the model's structure or weights after it is built is not seen: build a new decoder.
    It computes the model as in eval mode (no dropout).

    Raises:
        UnsupportedModelError: a model it does not compute (:func:`read_architecture` says why).
    """

    def __init__(self, model: nn.Module, fuse: bool = True, capacity: int = 256) -> None:
        self.arch: Architecture = read_architecture(model)
        self.model = model
        a = self.arch
        self.qkv = [Projection(b.qkv, fuse) for b in a.blocks]
        self.up = [Projection(b.up, fuse) for b in a.blocks]
        self.o = [Projection([b.o], False) for b in a.blocks]
        self.down = [Projection([b.down], False) for b in a.blocks]
        self.head = Projection([a.head], False)
        self._check_shapes()
        self.ops = step_ops()
        self.native_step = True  # False: the Python loop over the same kernels (tests compare the two)
        self.pos = 0
        self._plan_threads = None
        self._alloc(capacity)

    # ---- construction --------------------------------------------------------------------------
    def _check_shapes(self) -> None:
        a = self.arch
        q, kv = a.heads * a.head_dim, a.kv_heads * a.head_dim
        width = 2 * a.intermediate if a.act in GATED else a.intermediate
        for i in range(len(a.blocks)):
            got = (self.qkv[i].out_features, self.o[i].in_features, self.up[i].out_features, self.down[i].in_features)
            if got != (q + 2 * kv, q, width, a.intermediate):
                raise UnsupportedModelError(f"block {i}: projection widths (qkv, o in, up, down in) = {got}, expected "
                                            f"{(q + 2 * kv, q, width, a.intermediate)} from the config")

    def _alloc(self, capacity: int) -> None:
        """KV caches and rotary tables for ``capacity`` positions (keeping the cached ones)."""
        a = self.arch
        if a.max_positions is not None:
            capacity = min(capacity, a.max_positions)
        old_k, old_v = getattr(self, "k_cache", None), getattr(self, "v_cache", None)
        self.k_cache = [np.zeros((a.kv_heads, a.head_dim, capacity), np.float32) for _ in a.blocks]
        self.v_cache = [np.zeros((a.kv_heads, capacity, a.head_dim), np.float32) for _ in a.blocks]
        if old_k is not None and self.pos:
            for i in range(len(a.blocks)):
                self.k_cache[i][:, :, : self.pos] = old_k[i][:, :, : self.pos]
                self.v_cache[i][:, : self.pos] = old_v[i][:, : self.pos]
        self.capacity = capacity
        if a.rotary is not None:
            inv_freq, scaling = a.rotary
            freqs = torch.arange(capacity, dtype=torch.float32)[:, None] * inv_freq[None, :]
            self.cos, self.sin = (freqs.cos() * scaling).numpy(), (freqs.sin() * scaling).numpy()

    def _reserve(self, end: int) -> None:
        a = self.arch
        if a.max_positions is not None and end > a.max_positions:
            raise ValueError(f"{end} positions: this {a.family} model attends at most {a.max_positions} "
                             "(its position table or sliding window); the decoder does not go past it")
        if end > self.capacity:
            self._alloc(max(end, 2 * self.capacity))

    def _plan(self) -> None:
        """Binds every step call to the buffers (again when torch's thread count changed)."""
        threads = torch.get_num_threads()
        if self._plan_threads == threads:
            return
        a = self.arch
        q = a.heads * a.head_dim
        width = self.up[0].out_features
        b = _Buffers(_row(a.hidden), _row(a.hidden), _row(q + 2 * a.kv_heads * a.head_dim), _row(q), _row(a.hidden),
                     _row(width), _row(a.intermediate), _row(self.head.out_features))
        self.buf = b
        self.head_calls = self.head.bind(b.x, b.logits, threads)
        self.native = self._native_plan() if self.native_step else None
        if self.native is None:  # the Python loop's calls, one per kernel
            self.steps = [(_norm_args(blk.norm1, a.norm), self.qkv[i].bind(b.x, b.qkv, threads),
                           self.o[i].bind(b.att, b.r, threads), _norm_args(blk.norm2, a.norm),
                           self.up[i].bind(b.x, b.g, threads), self.down[i].bind(b.a, b.r, threads), _qk_args(blk))
                          for i, blk in enumerate(a.blocks)]
            self.final_norm = _norm_args(a.final_norm, a.norm)
        self._plan_threads = threads

    def _native_plan(self):
        """The whole step as one C++ call (the extension's DecodePlan), where every block projection has
        a C++ kernel; the head runs in it too when it has one. None otherwise (the Python loop runs)."""
        if not hasattr(self.ops, "DecodePlan"):
            return None
        a, b = self.arch, self.buf
        groups = [(self.qkv[i].kernel_specs(), self.o[i].kernel_specs(), self.up[i].kernel_specs(),
                   self.down[i].kernel_specs()) for i in range(len(a.blocks))]
        if any(spec is None for g in groups for spec in g):
            return None
        head = self.head.kernel_specs()
        plan = self.ops.DecodePlan(a.hidden, a.heads, a.kv_heads, a.head_dim, a.intermediate, a.norm == "layer", a.act,
                                   a.scale, (b.h, b.x, b.qkv, b.att, b.r, b.g, b.a, b.logits if head else None))
        for blk, (qkv, o, up, down) in zip(a.blocks, groups):
            qk = _qk_args(blk)
            plan.add_block(_norm_tuple(blk.norm1), _norm_tuple(blk.norm2), qkv, o, up, down,
                           None if qk[0] is None else qk)
        plan.set_final(_norm_tuple(a.final_norm), head or [])
        self.head_in_plan = bool(head)
        self._native_capacity = None
        return plan

    # ---- running -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the sequence (the next call starts at position 0)."""
        self.pos = 0

    def _norm(self, h: torch.Tensor, n: Norm) -> torch.Tensor:
        if self.arch.norm == "layer":
            return F.layer_norm(h, (h.shape[-1],), n.weight, n.bias, n.eps)
        return n.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + n.eps))

    def _act(self, g: torch.Tensor) -> torch.Tensor:
        act = self.arch.act
        if act in GATED:
            gate, up = g.chunk(2, dim=-1)
            return (F.silu(gate) if act == ACT_SILU_MUL else F.gelu(gate, approximate="tanh")) * up
        return F.gelu(g, approximate="tanh" if act == ACT_GELU_TANH else "none")

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """x [M, heads, hd] at positions start.. rotated (rotate-half)."""
        m = x.shape[0]
        cos = torch.from_numpy(self.cos[start:start + m])[:, None]
        sin = torch.from_numpy(self.sin[start:start + m])[:, None]
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def _attention(self, i: int, qkv: torch.Tensor, start: int) -> torch.Tensor:
        a, m = self.arch, qkv.shape[0]
        q_len, kv_len = a.heads * a.head_dim, a.kv_heads * a.head_dim
        q = qkv[:, :q_len].reshape(m, a.heads, a.head_dim)
        k = qkv[:, q_len:q_len + kv_len].reshape(m, a.kv_heads, a.head_dim)
        v = qkv[:, q_len + kv_len:].reshape(m, a.kv_heads, a.head_dim)
        qk_norm = a.blocks[i].qk_norm
        if qk_norm is not None:
            q, k = _head_norm(q, qk_norm[0]), _head_norm(k, qk_norm[1])
        if a.rotary is not None:
            q, k = self._rotate(q, start), self._rotate(k, start)
        kc, vc = torch.from_numpy(self.k_cache[i]), torch.from_numpy(self.v_cache[i])
        end = start + m
        kc[:, :, start:end] = k.permute(1, 2, 0)
        vc[:, start:end] = v.permute(1, 0, 2)
        group = a.heads // a.kv_heads
        keys = kc[:, :, :end].transpose(1, 2).repeat_interleave(group, 0)   # [heads, T, hd]
        values = vc[:, :end].repeat_interleave(group, 0)
        mask = None if start == 0 else (torch.arange(end)[None, :] <= torch.arange(start, end)[:, None])
        # 4-D [1, heads, T, hd]: torch's fused CPU attention (3-D inputs take its unfused path)
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                             is_causal=start == 0 and m > 1, scale=a.scale)
        return out[0].transpose(0, 1).reshape(m, q_len)

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Runs ``ids`` [1, M] (or [M]) from the current position; returns the logits of the last token
        [1, vocab] (of every token [M, vocab] with ``all_logits``)."""
        ids = self._check_ids(ids)
        start, m = self.pos, ids.shape[0]
        self._reserve(start + m)
        a = self.arch
        h = self._embed(ids)
        if a.positions is not None:
            h = h + a.positions(torch.arange(start, start + m))
        for i, blk in enumerate(a.blocks):
            h = h + self.o[i](self._attention(i, self.qkv[i](self._norm(h, blk.norm1)), start))
            h = h + self.down[i](self._act(self.up[i](self._norm(h, blk.norm2))))
        self.pos = start + m
        last = h if all_logits else h[-1:]
        return self.head(self._norm(last, a.final_norm))

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.arch.embed(ids).float()
        return h if self.arch.embed_scale == 1.0 else h * torch.tensor(self.arch.embed_scale, dtype=torch.float32)

    def _check_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids: {type(ids).__name__} {getattr(ids, 'dtype', '')}, expected an integer tensor")
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise ValueError(f"ids: shape {tuple(ids.shape)}: the decoder runs one sequence (batch 1)")
        flat = ids.reshape(-1).long()
        if flat.numel() == 0 or ids.dim() > 2:
            raise ValueError(f"ids: shape {tuple(ids.shape)}, expected [1, M] or [M] with M >= 1")
        return flat

    def _step(self, token: int) -> np.ndarray:
        """One token at the current position: the logits row, in the decoder's reused buffer."""
        self._reserve(self.pos + 1)
        self._plan()
        a, pos = self.arch, self.pos
        h = self._embed(torch.tensor([token]))
        if a.positions is not None:
            h = h + a.positions(torch.tensor([pos]))
        self.buf.h[:] = h.numpy()
        if self.native is not None:
            self._run_native(pos)
        else:
            self._run_loop(pos)
        self.pos = pos + 1
        return self.buf.logits

    def _run_native(self, pos: int) -> None:
        """The blocks (and the head, when it has a kernel) in one C++ call."""
        if self._native_capacity != self.capacity:  # the caches grew: the plan points at the new ones
            rot = (self.cos, self.sin) if self.arch.rotary is not None else (None, None)
            self.native.set_state(self.k_cache, self.v_cache, *rot)
            self._native_capacity = self.capacity
        self.native.run(pos, self._plan_threads)
        if not self.head_in_plan:
            for c in self.head_calls:
                c()

    def _run_loop(self, pos: int) -> None:
        """The same step as Python calls, one per kernel (a layer without a C++ kernel, or no extension)."""
        a, b, o = self.arch, self.buf, self.ops
        cos, sin = (self.cos[pos], self.sin[pos]) if a.rotary is not None else (None, None)
        norm = o.add_rms_norm if a.norm == "rms" else o.add_layer_norm
        threads, residual = self._plan_threads, None
        for (n1, qkv, out, n2, up, down, qk), kc, vc in zip(self.steps, self.k_cache, self.v_cache):
            norm(b.h, residual, *n1, b.x)
            for c in qkv:
                c()
            o.attend(b.qkv, a.heads, a.kv_heads, kc, vc, cos, sin, pos, a.scale, b.att, threads, *qk)
            for c in out:
                c()
            norm(b.h, b.r, *n2, b.x)
            for c in up:
                c()
            o.act_mul(b.g, a.act, b.a)
            for c in down:
                c()
            residual = b.r
        norm(b.h, residual, *self.final_norm, b.x)
        for c in self.head_calls:
            c()

    @torch.no_grad()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Runs one token at the current position; returns its logits [1, vocab] (a new tensor)."""
        if isinstance(token, torch.Tensor):
            if token.numel() != 1:
                raise ValueError(f"token: {token.numel()} values, expected one")
            token = int(token.reshape(-1)[0])
        return torch.from_numpy(self._step(int(token)).copy())

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None, *,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """The continuation of ``ids`` [1, P] from an empty cache: [1, P + new], new <= max_new_tokens.

        It stops after an end token: ``eos_token_id`` (int or list), by default the model's
        ``generation_config.eos_token_id``; ``[]`` never stops early. Greedy by default; ``do_sample``
        samples from softmax(logits / temperature), within the ``top_k`` most likely tokens and the
        smallest set whose probability reaches ``top_p`` (as Hugging Face's ``generate`` does), drawing
        from ``generator`` (torch's default one if None)."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 0")
        pick = Sampler(do_sample, temperature, top_k, top_p, generator)
        prompt = self._check_ids(ids)
        stop = set(eos_ids(self.model, eos_token_id))
        self.reset()
        if max_new_tokens == 0:
            return prompt[None]
        self._reserve(len(prompt) + max_new_tokens)
        out = [pick(self.prefill(prompt)[0])]
        while len(out) < max_new_tokens and out[-1] not in stop:
            out.append(pick(torch.from_numpy(self._step(out[-1])[0])))
        return torch.cat([prompt, torch.tensor(out)])[None]


class Sampler:
    """The next token from a logits row: the argmax, or a draw (see :meth:`Decoder.generate`)."""

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None) -> None:
        if not do_sample and (temperature != 1.0 or top_k is not None or top_p is not None):
            raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p} with do_sample=False: they "
                             "shape sampling only (pass do_sample=True)")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature={temperature!r}: must be a positive number")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r}: must be an int >= 1 (or None)")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r}: must be in (0, 1] (or None)")
        self.do_sample, self.temperature, self.top_k, self.top_p, self.generator = (
            do_sample, float(temperature), top_k, top_p, generator)

    def __call__(self, logits: torch.Tensor) -> int:
        if not self.do_sample:
            return int(logits.argmax())
        x = logits.double() / self.temperature
        if self.top_k is not None and self.top_k < x.numel():
            x = x.masked_fill(x < x.topk(self.top_k).values[-1], float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            order = x.argsort(descending=True)
            probs = x[order].softmax(-1)
            drop = probs.cumsum(-1) - probs >= self.top_p  # tokens past the smallest set reaching top_p
            x = x.index_fill(0, order[drop], float("-inf"))
        return int(torch.multinomial(x.softmax(-1), 1, generator=self.generator))


def eos_ids(model: nn.Module, eos_token_id) -> list[int]:
    """The end tokens: ``eos_token_id`` as a list, or the model's ``generation_config.eos_token_id`` for None."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def _head_norm(x: torch.Tensor, n: Norm) -> torch.Tensor:
    """x [M, heads, hd] with each head RMS-normalized and scaled (Qwen3's q_norm / k_norm)."""
    return n.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + n.eps))


def _qk_args(blk) -> tuple:
    """attend's (q_norm, k_norm, norm_eps) of a block: numpy weights, or (None, None, 0.0)."""
    if blk.qk_norm is None:
        return (None, None, 0.0)
    q, k = blk.qk_norm
    return (q.weight.detach().float().contiguous().numpy(), k.weight.detach().float().contiguous().numpy(), q.eps)


def _norm_tuple(n: Norm) -> tuple:
    """(weight, bias or None, eps) as float32 numpy arrays, for the native plan."""
    bias = None if n.bias is None else n.bias.detach().float().contiguous().numpy()
    return (n.weight.detach().float().contiguous().numpy(), bias, n.eps)


def _norm_args(n: Norm, kind: str) -> tuple:
    """The arguments of add_rms_norm / add_layer_norm between the residual and the output."""
    w, b, eps = _norm_tuple(n)
    return (w, eps) if kind == "rms" else (w, b, eps)


def generate(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
             decoder: str = "auto", **sampling) -> torch.Tensor:
    """Generation with the qruntime :class:`Decoder` where it reads the model, else (``decoder="auto"``)
    with Hugging Face's ``model.generate`` and a warning that says why; ``decoder="qruntime"`` raises
    instead of falling back, ``"hf"`` always uses Hugging Face's. ``eos_token_id`` and ``sampling``
    (``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``generator``): as :meth:`Decoder.generate`
    (Hugging Face's ``generate`` draws from torch's default generator)."""
    if decoder not in ("auto", "qruntime", "hf"):
        raise ValueError(f"decoder={decoder!r}: expected 'auto', 'qruntime' or 'hf'")
    Sampler(**sampling)  # the arguments are checked before any work, on both paths
    if decoder != "hf":
        try:
            dec = Decoder(model)
        except UnsupportedModelError as exc:
            if decoder == "qruntime":
                raise
            warnings.warn(f"qruntime decoder not used ({exc}); generating with Hugging Face's generate()",
                          RuntimeWarning, stacklevel=2)
        else:
            return dec.generate(ids, max_new_tokens, eos_token_id, **sampling)
    ids = ids if ids.dim() == 2 else ids[None]
    sampling.pop("generator", None)
    return model.generate(ids, max_new_tokens=max_new_tokens, eos_token_id=eos_ids(model, eos_token_id) or None,
                          do_sample=sampling.pop("do_sample", False), attention_mask=torch.ones_like(ids), **sampling)
