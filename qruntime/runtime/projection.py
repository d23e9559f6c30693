"""One linear step of the decoder: a group of projections of the same input (q, k, v; gate, up; or one
layer) bound to the step's buffers.

A group of QuantLinear layers with one format is fused into one QuantLinear (rows concatenated: exact,
each output channel keeps its codes and scale), so a decoding step makes one kernel call where the model
makes three. Each part of a group that is not fused runs on its own into its slice of the output.
At one token the C++ kernel of a QuantLinear / SparseLinear is called directly on the buffers; a float
``nn.Linear`` / GPT-2 ``Conv1D`` runs ``torch.addmm`` into the buffer; any other module runs its forward.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from qruntime.nn.modules import QuantLinear, is_conv1d
from qruntime.ops import registry as ops

__all__ = ["fuse", "out_features", "Projection"]


def out_features(module: nn.Module) -> int:
    if is_conv1d(module):
        return module.weight.shape[1]
    if hasattr(module, "out_features"):
        return module.out_features
    raise TypeError(f"{type(module).__name__}: no out_features; the decoder takes Linear-like projections")


def in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.in_features


def _fusable(mods: list[nn.Module]) -> bool:
    first = mods[0]
    return len(mods) > 1 and all(
        type(m) is QuantLinear and m.weight_format == first.weight_format and m.group_size == first.group_size
        and m.in_features == first.in_features and m.qweight.is_cpu for m in mods)


def fuse(mods: list[nn.Module]) -> list[nn.Module]:
    """``mods`` as one QuantLinear with their output channels in order, where they share a format; else
    ``mods`` unchanged. The fused module holds its own copy of the packed weights."""
    if not _fusable(mods):
        return list(mods)
    first = mods[0]
    fused = QuantLinear(first.in_features, sum(m.out_features for m in mods), first.weight_format,
                        bias=any(m.bias is not None for m in mods), device="meta")
    fused.qweight = torch.cat([m.qweight for m in mods], 0)
    fused.scales = torch.cat([m.scales for m in mods], -1)
    fused.zeros = None if first.zeros is None else torch.cat([m.zeros for m in mods], -1)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([m.bias.detach().float() if m.bias is not None else torch.zeros(m.out_features)
                                             for m in mods]), requires_grad=False)
    return [fused]


def _dense_call(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Callable[[], object]:
    """out = x @ W.T + b for a float Linear / Conv1D (W read as [in, out] without a copy)."""
    w = module.weight.detach()
    wt = w if is_conv1d(module) else w.t()
    b = module.bias
    if b is None:
        return functools.partial(torch.mm, x, wt, out=out)
    return functools.partial(torch.addmm, b.detach(), x, wt, out=out)


def _module_call(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Callable[[], object]:
    def call():
        out.copy_(module(x).reshape(out.shape))
    return call


def _bind(module: nn.Module, x: np.ndarray, out: np.ndarray, threads: int) -> Callable[[], object]:
    kernel = ops.module_kernel_call(module)
    if kernel is not None:
        fn, args = kernel
        return functools.partial(fn, x, *args, out.shape[1], out, threads)
    xt, ot = torch.from_numpy(x), torch.from_numpy(out)
    if (isinstance(module, nn.Linear) or is_conv1d(module)) and module.weight.dtype == torch.float32:
        return _dense_call(module, xt, ot)
    return _module_call(module, xt, ot)


class Projection:
    """A group of projections of one input, fused where possible (:func:`fuse`); its output is the
    concatenation of theirs, in order."""

    def __init__(self, mods: list[nn.Module], fuse_group: bool = True) -> None:
        self.modules = fuse(mods) if fuse_group else list(mods)
        self.in_features = in_features(mods[0])
        self.out_features = sum(out_features(m) for m in mods)
        if any(in_features(m) != self.in_features for m in mods):
            raise ValueError(f"projections of one input with in_features {[in_features(m) for m in mods]}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Any number of rows [M, in_features] (prefill): the modules' own forwards."""
        outs = [m(x) for m in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)

    def kernel_specs(self) -> list[tuple] | None:
        """The group as the native decode plan takes it: ``(kernel name, its arguments, n, k, out offset)``
        per module, or None when a module has no C++ kernel (a float layer: it runs in Python)."""
        specs, start = [], 0
        for m in self.modules:
            kernel = ops.module_kernel_call(m)
            if kernel is None:
                return None
            n = out_features(m)
            specs.append((kernel[0].__name__, kernel[1], n, self.in_features, start))
            start += n
        return specs

    def bind(self, x: np.ndarray, out: np.ndarray, threads: int) -> list[Callable[[], object]]:
        """Zero-argument calls that compute ``out`` [1, out_features] from ``x`` [1, in_features] (numpy
        float32 buffers the caller keeps), one per module of the group."""
        calls, start = [], 0
        for m in self.modules:
            n = out_features(m)
            calls.append(_bind(m, x, out[:, start:start + n], threads))
            start += n
        return calls
