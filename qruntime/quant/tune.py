"""Block output tuning (``-tune``): after a block's layers are compressed, what is left free in them is
adjusted by gradient descent so that the block's output on the calibration windows comes closer to the
float model's output of that block (:func:`qruntime.calibration.blockwise.blockwise_calibrate`: the block runs on
the compressed model's hidden states, so it also makes up for the error of the blocks before it).

* Quantized layers (:func:`tune_block_scales`): codes fixed (round to nearest or GPTQ), the float scales
  are trained. Per layer the dequantized weight is ``W(s) = (codes - zeros) * s`` (docs/formats.md),
  linear in the scales ``s`` ([G, N] for INT4, [N] for INT8); only ``s`` is trained, as
  ``s = s0 * (1 + t)`` with ``t`` initialized to 0, so the packed codes, the zero points and the format
  do not change. With learned rounding (``-round``, :class:`_RoundedWeight`) the codes are trained too,
  each free to move by one, to the other grid point next to the value it was rounded from; the zero
  points and the format still do not change.
* 2:4-pruned layers (:func:`tune_block_weights`): the mask fixed (SparseGPT or Wanda), the kept weights
  are trained, as ``mask * (W0 + r * t)`` with ``r`` each row's root mean square; pruned weights stay
  exactly zero.

Unlike GPTQ's and SparseGPT's layer-by-layer objective, the block objective sees the attention and MLP
nonlinearities and how the errors of the block's layers combine.

The loss is the block output's squared error relative to the float output's squared norm, per token,
averaged over the tokens: the next block's RMSNorm (or LayerNorm) sees each token's hidden state
relative to its own norm, while a ratio of sums over the window would be dominated by the few tokens
whose hidden state is orders of magnitude larger than the rest (in SmolLM2, one calibration window: the
first token carries 98%, 97% and 83% of the sum of squares of the hidden states after blocks 11, 17 and
24). A quarter of the calibration windows (at least one; none when there is only one window; at most
``MAX_HELD_OUT``: each costs a forward pass per measurement) is held out of the steps: the loss on them
is measured before tuning and every few steps, the values with the lowest held-out loss are kept, and
only if it is below the loss before tuning. So tuning stops before it fits the calibration windows at
the expense of other text, and a block is never made worse on its own held-out measure.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qruntime.formats.packing import dequantize_int4, dequantize_int4_codes, dequantize_int8, pack_int4, unpack_int4

__all__ = ["BlockTuneResult", "tune_block_scales", "tune_block_weights"]

# Adam learning rate of the rounding offsets v in [-1/2, 1/2] ("-round"). Adam moves every v by about its
# learning rate in each of the first steps, whatever the gradient's size, so AutoRound's 1 / steps (for
# signed SGD) flips a large share of the codes within a few steps: on SmolLM2's first blocks (32 windows,
# 64 steps) 1/64 left block 0 no better than GPTQ, 3e-3 tuned it less than the scales alone, 1e-3 and
# 3e-4 a little more (held-out error 0.00243 against 0.00244; at 64 windows 0.00262 against 0.00267).
ROUND_LR = 1e-3

# held-out windows at most: 16 of 64 windows is a quarter; with more windows the extra ones train
MAX_HELD_OUT = 16


@dataclass
class BlockTuneResult:
    """What tuning one block did: relative output error on the held-out windows before / after, and the
    step whose scales were kept (0: none, the block is unchanged)."""

    loss_before: float
    loss_after: float
    kept: bool
    step: int = 0


class _Tuned:
    """What :func:`_tune` asks of a layer's trainable weight: ``weight(dtype)`` (differentiable in the
    trainables), ``commit()``, and these defaults for one trainable tensor ``t``."""

    t: torch.Tensor

    def trainables(self) -> list[torch.Tensor]:
        return [self.t]

    def groups(self, lr: float) -> list[dict]:
        """The Adam parameter groups of :meth:`trainables`."""
        return [{"params": [self.t], "lr": lr}]

    def project(self) -> None:
        """After each step: back into the allowed range (by default any value is allowed)."""


class _ScaledWeight(_Tuned):
    """``W(t)``: the layer's codes dequantized (:mod:`qruntime.formats.packing`) with the scales ``s0 * (1 + t)``,
    differentiable in ``t``; at ``t = 0`` exactly ``QuantLinear.dequantized_weight()``."""

    def __init__(self, q, transpose: bool) -> None:
        self.q = q
        self.s0 = q.scales.detach().to(torch.float32)
        self.t = torch.zeros_like(self.s0, requires_grad=True)
        self.transpose = transpose

    def scales(self) -> torch.Tensor:
        return self.s0 * (1 + self.t)

    def commit(self) -> None:
        """The kept ``t`` becomes the QuantLinear's scales."""
        self.q.scales = self.scales().detach().clone().to(self.q.scales.dtype)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.q
        if q.weight_format.bits == 8:
            w = dequantize_int8(q.qweight, self.scales())
        else:
            w = dequantize_int4(q.qweight, self.scales(), q.zeros, q.group_size, q.in_features)
        w = w.to(dtype)
        return w.t() if self.transpose else w


class _RoundedWeight(_ScaledWeight):
    """``W(t, v)``: :class:`_ScaledWeight` with the codes trained too (``-round``). Each code ``c0`` was
    rounded from a value ``u`` (:func:`qruntime.quant.linear.quantize_linear_unrounded`); with
    ``f = clamp(u - c0, -1/2, 1/2)`` the codes are ``clamp(c0 + round(f + v))`` in the code range, with
    ``v`` in [-1/2, 1/2] trained through the rounding (straight-through gradient). At ``v = 0`` they are
    the codes ``c0``; a code can only move to the other grid point next to ``u``, and the nearer ``u``
    was to it, the smaller the ``v`` that moves it (AutoRound, Cheng et al., 2023, from GPTQ's values)."""

    def __init__(self, q, unrounded: torch.Tensor, transpose: bool, round_lr: float) -> None:
        super().__init__(q, transpose)
        if q.weight_format.bits == 8:
            self.c0 = q.qweight.to(torch.float32)
            self.low, self.high = -127.0, 127.0
        else:
            self.c0 = unpack_int4(q.qweight).to(torch.float32)
            self.low, self.high = 0.0, 15.0
        if unrounded.shape != self.c0.shape:
            raise ValueError(f"unrounded: shape {tuple(unrounded.shape)}, expected {tuple(self.c0.shape)} (the codes')")
        self.f = (unrounded.to(torch.float32) - self.c0).clamp_(-0.5, 0.5)
        self.v = torch.zeros_like(self.c0, requires_grad=True)
        self.round_lr = round_lr

    def trainables(self) -> list[torch.Tensor]:
        return [self.t, self.v]

    def groups(self, lr: float) -> list[dict]:
        return [{"params": [self.t], "lr": lr}, {"params": [self.v], "lr": self.round_lr}]

    def project(self) -> None:
        with torch.no_grad():
            self.v.clamp_(-0.5, 0.5)

    def codes(self) -> torch.Tensor:
        x = self.f + self.v
        return torch.clamp(self.c0 + (x + (torch.round(x) - x).detach()), self.low, self.high)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        q = self.q
        if q.weight_format.bits == 8:
            w = dequantize_int8(self.codes(), self.scales())
        else:
            w = dequantize_int4_codes(self.codes(), self.scales(), q.zeros, q.group_size, q.in_features)
        w = w.to(dtype)
        return w.t() if self.transpose else w

    def commit(self) -> None:
        """The kept ``t`` and ``v`` become the QuantLinear's scales and codes."""
        super().commit()
        codes = torch.round(self.codes().detach())
        self.q.qweight = codes.to(torch.int8) if self.q.weight_format.bits == 8 else pack_int4(codes.to(torch.uint8))


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of ``||out_t - y_t||^2 / ||y_t||^2`` (hidden states ``[..., T, H]``)."""
    out, y = out.float(), y.float()
    return torch.mean(torch.sum((out - y) ** 2, -1) / torch.sum(y ** 2, -1).clamp_min(1e-30))


@torch.no_grad()
def _relative_error(block, params, inputs, targets) -> float:
    """:func:`_loss` of ``block(x; params)`` against the targets, averaged over the windows."""
    total = 0.0
    for (h, args, kwargs), y in zip(inputs, targets):
        total += _loss(_output(torch.func.functional_call(block, params, (h, *args), kwargs)), y).item()
    return total / len(targets)


def _output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def tune_block_scales(
    block: nn.Module,
    layers: Mapping[str, tuple[nn.Module, nn.Module]],
    inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
    targets: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float = 2e-3,
    transpose: Mapping[str, bool] | None = None,
    check_every: int = 8,
    unrounded: Mapping[str, torch.Tensor] | None = None,
    round_lr: float = ROUND_LR,
) -> BlockTuneResult:
    """Tunes the scales of the quantized layers of ``block`` in place (and with ``unrounded``, their
    rounding).

    Args:
        block: the transformer block, its target layers holding the *dequantized* weights.
        layers: ``{name relative to block: (layer in block, QuantLinear holding its codes)}``; on
            success each QuantLinear's ``scales`` are replaced and the layer's weight set to match.
        inputs: per calibration window, the block's call ``(hidden_states, args, kwargs)``.
        targets: per window, the output the block should give for that call (in ``compress``, the float
            model's output of this block on that window).
        steps: optimizer steps, one window each, cycling through the windows not held out.
        transpose: names whose module stores the weight transposed (GPT-2 ``Conv1D``).
        check_every: steps between measurements of the held-out loss (and after the last step).
        unrounded: ``{name: the values its codes were rounded from}``
            (:func:`qruntime.quant.linear.quantize_linear_unrounded`): those layers' codes are trained too
            (:class:`_RoundedWeight`), and on success their packed codes replaced.
        round_lr: the Adam learning rate of the rounding offsets ``v`` (see :data:`ROUND_LR`)
    """
    _check(steps, check_every, inputs, targets)
    transpose = transpose or {}
    unrounded = unrounded or {}
    if set(unrounded) - set(layers):
        raise ValueError(f"unrounded: {sorted(set(unrounded) - set(layers))} are not among the layers {sorted(layers)}")
    if not 0 < round_lr <= 1:
        raise ValueError(f"round_lr={round_lr}: must be in (0, 1]")
    weights = {name: (_RoundedWeight(q, unrounded[name], transpose.get(name, False), round_lr) if name in unrounded
                      else _ScaledWeight(q, transpose.get(name, False))) for name, (_, q) in layers.items()}
    return _tune(block, {name: module for name, (module, _) in layers.items()}, weights, inputs, targets,
                 steps=steps, lr=lr, check_every=check_every)


class _MaskedWeight(_Tuned):
    """``W(t) = mask * (W0 + r * t)``: the pruned weight ``W0`` [N, K] moved only where ``mask`` keeps it,
    in steps relative to each output row's root mean square ``r`` (so one learning rate fits layers of
    any scale); at ``t = 0`` exactly ``W0``."""

    def __init__(self, module: nn.Module, mask: torch.Tensor, transpose: bool) -> None:
        w = module.weight.detach()
        self.transpose = transpose
        self.w0 = (w.t() if transpose else w).to(torch.float32).contiguous()
        if mask.shape != self.w0.shape:
            raise ValueError(f"mask: shape {tuple(mask.shape)}, expected {tuple(self.w0.shape)} ([N, K] of the layer)")
        self.keep = mask.to(torch.float32)
        self.w0 = self.w0 * self.keep
        kept = self.keep.sum(1, keepdim=True).clamp_min(1)
        self.rms = torch.sqrt((self.w0**2).sum(1, keepdim=True) / kept).clamp_min(1e-12)
        self.t = torch.zeros_like(self.w0, requires_grad=True)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        w = (self.keep * (self.w0 + self.rms * self.t)).to(dtype)
        return w.t() if self.transpose else w

    def commit(self) -> None:
        """Nothing besides the layer's weight holds the kept values."""


def tune_block_weights(
    block: nn.Module,
    layers: Mapping[str, tuple[nn.Module, torch.Tensor]],
    inputs: Sequence[tuple[torch.Tensor, tuple, dict]],
    targets: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float = 3e-3,
    transpose: Mapping[str, bool] | None = None,
    check_every: int = 8,
) -> BlockTuneResult:
    """Tunes the kept weights of the pruned layers of ``block`` in place, the masks fixed (2:4 ``-tune``).

    Args:
        block: the transformer block, its target layers holding the pruned weights.
        layers: ``{name relative to block: (layer in block, mask bool [N, K], True = kept)}``; on success
            each layer's weight is replaced by the tuned one, still zero wherever its mask is False.
        inputs, targets, steps, transpose, check_every: as in :func:`tune_block_scales`.
        lr: the Adam learning rate, on each weight's change relative to its row's root mean square.
    """
    _check(steps, check_every, inputs, targets)
    transpose = transpose or {}
    weights = {name: _MaskedWeight(module, mask, transpose.get(name, False)) for name, (module, mask) in layers.items()}
    return _tune(block, {name: module for name, (module, _) in layers.items()}, weights, inputs, targets,
                 steps=steps, lr=lr, check_every=check_every)


def _check(steps: int, check_every: int, inputs: Sequence, targets: Sequence) -> None:
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")
    if check_every < 1:
        raise ValueError(f"check_every={check_every}: must be >= 1")
    if not inputs or len(inputs) != len(targets):
        raise ValueError(f"block tuning: {len(inputs)} inputs for {len(targets)} targets")


def _tune(block, modules: Mapping[str, nn.Module], weights: Mapping, inputs, targets, *, steps: int, lr: float,
          check_every: int) -> BlockTuneResult:
    """The shared loop. ``weights[name]`` (a ``_ScaledWeight``, ``_RoundedWeight`` or ``_MaskedWeight``)
    gives the weight of ``modules[name]`` as a function of its trainables: Adam on them, one window a step
    cycling through the windows not held out, the held-out loss measured before and every ``check_every``
    steps. When a step beat the loss before tuning, the best step's values are committed and each
    module's weight replaced by the matching one; otherwise nothing changes."""
    dtypes = {name: module.weight.dtype for name, module in modules.items()}

    def params() -> dict[str, torch.Tensor]:
        return {f"{name}.weight": w.weight(dtypes[name]) for name, w in weights.items()}

    trainables = {name: w.trainables() for name, w in weights.items()}
    held = min(MAX_HELD_OUT, len(inputs) // 4) if len(inputs) >= 4 else min(1, len(inputs) - 1)
    train = list(range(len(inputs) - held))
    val = list(range(len(inputs) - held, len(inputs))) or train
    val_in, val_out = [inputs[i] for i in val], [targets[i] for i in val]
    before = _relative_error(block, params(), val_in, val_out)
    best, best_step, best_t = before, 0, None
    ts = [t for group in trainables.values() for t in group]
    opt = torch.optim.Adam([g for w in weights.values() for g in w.groups(lr)])
    for step in range(1, steps + 1):
        i = train[(step - 1) % len(train)]
        h, args, kwargs = inputs[i]
        with torch.enable_grad():
            out = _output(torch.func.functional_call(block, params(), (h, *args), kwargs))
            loss = _loss(out, targets[i])
            # gradients of the trainables only: the model's own parameters get no .grad
            for t, g in zip(ts, torch.autograd.grad(loss, ts)):
                t.grad = g
        opt.step()
        for w in weights.values():
            w.project()
        if step % check_every == 0 or step == steps:
            error = _relative_error(block, params(), val_in, val_out)
            if error < best:
                best, best_step = error, step
                best_t = {name: [t.detach().clone() for t in group] for name, group in trainables.items()}
    if best_t is not None:
        with torch.no_grad():
            for name, w in weights.items():
                for t, kept in zip(trainables[name], best_t[name]):
                    t.copy_(kept)
                w.commit()
            final = params()
            for name, module in modules.items():
                module.weight = nn.Parameter(final[f"{name}.weight"].detach().clone(), requires_grad=False)
    return BlockTuneResult(before, best, best_t is not None, best_step)
