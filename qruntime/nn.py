"""QuantLinear: the module that replaces ``nn.Linear`` and GPT-2's ``Conv1D``."""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .config import QuantConfig
from .formats import (
    dequantize_int4,
    dequantize_int8,
    int4_codes,
    int4_padded_k,
    int4_params,
    int8_codes,
    int8_scales,
)
from .gptq import column_quantizer, gptq_quantize

__all__ = ["QuantLinear", "linear_weight", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """True for ``transformers.pytorch_utils.Conv1D`` (GPT-2's Linear with a transposed weight)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency, but the module must not need it to import
        return False
    return isinstance(module, Conv1D)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a Linear-like module as [out_features, in_features] (a view, not a copy)."""
    if is_conv1d(module):
        return module.weight.t()  # Conv1D stores [in_features, out_features]
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__}: not an nn.Linear or transformers Conv1D")


class QuantLinear(nn.Module):
    """y = x @ dequant(W).T + b with W stored packed (docs/formats.md).

    Buffers: ``qweight`` (int8 [N, K] or uint8 [N, Kp / 2]), ``scales`` (float32 [N] or [G, N]),
    ``zeros`` (uint8 [G, N], asymmetric INT4 only); ``bias`` is a parameter in the original dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        quant: QuantConfig,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features={in_features}, out_features={out_features}: must be positive")
        self.in_features, self.out_features, self.quant = in_features, out_features, quant
        n, k = out_features, in_features
        if quant.bits == 8:
            self.group_size = k
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(n, dtype=torch.float32, device=device))
            self.register_buffer("zeros", None)
        else:
            kp = int4_padded_k(k, quant.group_size)
            self.group_size = kp if quant.group_size is None else quant.group_size
            g = kp // self.group_size
            self.register_buffer("qweight", torch.zeros(n, kp // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(g, n, dtype=torch.float32, device=device))
            zeros = None if quant.symmetric else torch.zeros(g, n, dtype=torch.uint8, device=device)
            self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(
        cls, module: nn.Module, quant: QuantConfig, hessian: torch.Tensor | None = None
    ) -> "QuantLinear":
        """Quantizes an ``nn.Linear`` or a ``transformers`` ``Conv1D``.

        Scales and zero points come from the weight itself (round-to-nearest grid). With ``hessian``
        (float [K, K], X^T X of the layer's calibration inputs) the codes are chosen by GPTQ on that grid.
        """
        weight = linear_weight(module)
        n, k = weight.shape
        bias = module.bias
        out = cls(k, n, quant, bias=bias is not None, dtype=weight.dtype, device=weight.device)
        if quant.bits == 8:
            scales, zeros, group_size = int8_scales(weight), None, k
        else:
            scales, zeros, group_size = int4_params(weight, quant.group_size, quant.symmetric)
        target = weight
        if hessian is not None:
            target = gptq_quantize(
                weight,
                hessian,
                column_quantizer(quant.bits, scales, zeros, group_size),
                damp=quant.gptq_damp,
                block_size=quant.gptq_block_size,
                act_order=quant.gptq_act_order,
            )
        if quant.bits == 8:
            out.qweight, out.scales = int8_codes(target, scales), scales
        else:
            out.qweight, out.scales = int4_codes(target, scales, zeros, group_size), scales
            if zeros is not None:
                out.zeros = zeros
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out_features, in_features]."""
        if self.quant.bits == 8:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.in_features)

    def packed_bytes(self) -> int:
        """Bytes of the packed weight with its scales and zero points (bias not included)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if ops.eager_cpu(x2d, self.bias):  # the same CPU kernels the ops run, without the dispatcher
            y = ops.run_checked_module(self, x2d)
        elif self.quant.act_bits == 8:
            y = ops.w8a8_linear(x2d, self.qweight, self.scales, self.bias)
        elif self.quant.bits == 8:
            y = ops.w8a16_linear(x2d, self.qweight, self.scales, self.bias)
        else:
            y = ops.w4a16_linear(x2d, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def __getstate__(self):
        # the CPU kernels' cached arguments (ops.run_checked_module) are rebuilt on use, never saved
        state = self.__dict__.copy()
        state.pop("_cpu_plan", None)
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.quant.name}, "
            f"bias={self.bias is not None}"
        )
