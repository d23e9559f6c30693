"""The compressed modules: QuantLinear (replaces ``nn.Linear`` and GPT-2's ``Conv1D``), QuantEmbedding and
SparseLinear. Each knows its packed format (:class:`~qruntime.formats.packing.WeightFormat`), not the recipe
that chose its codes: the quantizers that build them are in :mod:`qruntime.quant.linear` and
:mod:`qruntime.sparse.pack`."""
from __future__ import annotations

import torch
from torch import nn

from qruntime.ops import registry as ops
from qruntime.formats.packing import (
    dequantize_int4,
    dequantize_int8,
    int4_codes,
    int4_padded_k,
    int4_params,
    int8_codes,
    int8_scales,
    pack_int4,
    unpack_int4,
    INT4_SYM_ZERO,
    WeightFormat,
    dequantize_sp24,
    sp24_padded_k,
    sp24_positions,
)

__all__ = ["QuantLinear", "QuantEmbedding", "SparseLinear", "linear_weight", "is_conv1d", "check_format",
           "embedding_scale"]


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


def check_format(weight_format, allow_none: bool = False) -> None:
    """TypeError unless ``weight_format`` is a :class:`WeightFormat` (or None where ``allow_none``)."""
    if weight_format is None and allow_none:
        return
    if not isinstance(weight_format, WeightFormat):
        raise TypeError(f"weight_format={weight_format!r}: must be a qruntime.formats.packing.WeightFormat "
                        "(a QuantConfig's .format)" + (" or None" if allow_none else ""))


def _keep_scales_float32(module: nn.Module, fn, recurse: bool) -> torch.dtype | None:
    """``nn.Module._apply`` that converts everything but keeps ``scales`` in float32 (the format's
    dtype: ``model.half()`` or ``model.to("cuda", torch.bfloat16)`` must not round the scales). The
    scales still follow a device move. Returns the floating dtype ``fn`` converted to, or None."""
    scales = module._buffers.get("scales")
    nn.Module._apply(module, fn, recurse)
    moved = module._buffers.get("scales")
    if scales is None or moved is None or moved.dtype == scales.dtype:
        return None
    module._buffers["scales"] = scales.to(device=moved.device)
    return moved.dtype


class _PackedLinear(nn.Module):
    """What the packed Linear modules share: ``.to(dtype)`` keeps ``scales`` float32, the CPU kernels'
    cached call is never pickled, and the repr names the format (``self.format``)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features={in_features}, out_features={out_features}: must be positive")
        self.in_features, self.out_features = in_features, out_features

    def _apply(self, fn, recurse=True):
        _keep_scales_float32(self, fn, recurse)
        return self

    def __getstate__(self):
        # the CPU kernels' cached arguments (ops.run_checked_module / run_sp24_module) are rebuilt on use
        state = self.__dict__.copy()
        state.pop("_cpu_plan", None)
        state.pop("_cpu_sp24_plan", None)
        return state

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"bias={self.bias is not None}"
        )


class QuantLinear(_PackedLinear):
    """y = x @ dequant(W).T + b with W stored packed (docs/formats.md).

    Buffers: ``qweight`` (int8 [N, K] or uint8 [N, Kp / 2]), ``scales`` (float32 [N] or [G, N]),
    ``zeros`` (uint8 [G, N], asymmetric INT4 only); ``bias`` is a parameter in the original dtype.
    ``.to(dtype)`` / ``.half()`` convert the bias and leave the scales in float32; the output always has
    the input's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: WeightFormat,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        check_format(weight_format)
        self.weight_format = weight_format
        n, k = out_features, in_features
        if weight_format.bits == 8:
            self.group_size = k
            self.register_buffer("qweight", torch.zeros(n, k, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(n, dtype=torch.float32, device=device))
            self.register_buffer("zeros", None)
        else:
            kp = int4_padded_k(k, weight_format.group_size)
            self.group_size = kp if weight_format.group_size is None else weight_format.group_size
            g = kp // self.group_size
            self.register_buffer("qweight", torch.zeros(n, kp // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scales", torch.ones(g, n, dtype=torch.float32, device=device))
            zeros = None if weight_format.symmetric else torch.zeros(g, n, dtype=torch.uint8, device=device)
            self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @classmethod
    def tied_to(cls, embedding: "QuantEmbedding", bias: torch.Tensor | None = None) -> "QuantLinear":
        """An output head ``x @ E^T`` that shares the packed tensors of ``embedding`` (stored once)."""
        out = cls(embedding.embedding_dim, embedding.num_embeddings, embedding.weight_format, bias=bias is not None,
                  dtype=embedding.out_dtype, device="meta")
        out.qweight, out.scales, out.zeros = embedding.qweight, embedding.scales, embedding.zeros
        if bias is not None:
            out.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """float32 [out_features, in_features]."""
        if self.weight_format.bits == 8:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, self.in_features)

    def packed_bytes(self) -> int:
        """Bytes of the packed weight with its scales and zero points (bias not included)."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [..., {self.in_features}] (in_features)")
        x2d = x.reshape(-1, self.in_features)
        # the bias from the module's dict: nn.Module.__getattr__ costs ~0.6 us, a decode-sized call a few
        if ops.eager_cpu(x2d, self._parameters.get("bias")):  # the CPU kernels, without the dispatcher
            y = ops.run_checked_module(self, x2d)
        elif self.weight_format.act_bits == 8:
            y = ops.w8a8_linear(x2d, self.qweight, self.scales, self.bias)
        elif self.weight_format.bits == 8:
            y = ops.w8a16_linear(x2d, self.qweight, self.scales, self.bias)
        else:
            y = ops.w4a16_linear(x2d, self.qweight, self.scales, self.zeros, self.group_size, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    @property
    def format(self) -> str:
        return self.weight_format.name


class QuantEmbedding(nn.Module):
    """An ``nn.Embedding`` whose table [num_embeddings, embedding_dim] is stored packed, one token per
    row, in the same formats as :class:`QuantLinear` (N = num_embeddings, K = embedding_dim); the
    looked-up rows are dequantized, multiplied by ``embed_scale`` (a scaled word embedding's factor, as
    Gemma's sqrt(hidden); 1.0 for a plain one) and cast to ``out_dtype``. Buffers: ``qweight``,
    ``scales``, ``zeros``.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        weight_format: WeightFormat,
        padding_idx: int | None = None,
        out_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        embed_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(f"num_embeddings={num_embeddings}, embedding_dim={embedding_dim}: must be positive")
        check_format(weight_format)
        if weight_format.act_bits != 16:
            raise ValueError(f"weight_format={weight_format.name}: an embedding has no activations to quantize (act_bits must be 16)")
        self.num_embeddings, self.embedding_dim, self.weight_format = num_embeddings, embedding_dim, weight_format
        self.padding_idx, self.out_dtype, self.embed_scale = padding_idx, out_dtype, float(embed_scale)
        shell = QuantLinear(embedding_dim, num_embeddings, weight_format, bias=False, device=device)
        self.group_size = shell.group_size
        self.register_buffer("qweight", shell.qweight)
        self.register_buffer("scales", shell.scales)
        self.register_buffer("zeros", shell.zeros)

    @classmethod
    def from_embedding(cls, module: nn.Embedding, weight_format: WeightFormat) -> "QuantEmbedding":
        """Round-to-nearest quantization of an ``nn.Embedding``'s table, row = token. A subclass whose
        forward scales the rows (``embed_scale``: Gemma's scaled word embeddings) keeps its factor.

        Raises:
            ValueError: a subclass whose forward is not the table's rows times one factor (it would be
                lost); the message names the module's class.
        """
        if not isinstance(module, nn.Embedding):
            raise TypeError(f"{type(module).__name__}: not an nn.Embedding")
        w = module.weight
        out = cls(module.num_embeddings, module.embedding_dim, weight_format, module.padding_idx, w.dtype, device=w.device,
                  embed_scale=embedding_scale(module))
        if weight_format.bits == 8:  # round to nearest on the min-max grid
            scales, zeros, group_size = int8_scales(w), None, w.shape[1]
        else:
            scales, zeros, group_size = int4_params(w, weight_format.group_size, weight_format.symmetric)
        if weight_format.bits == 8:
            out.qweight, out.scales = int8_codes(w, scales), scales
        else:
            out.qweight, out.scales = int4_codes(w, scales, zeros, group_size), scales
            if zeros is not None:
                out.zeros = zeros
        return out

    def _apply(self, fn, recurse=True):
        dtype = _keep_scales_float32(self, fn, recurse)
        if dtype is not None:  # model.half(): the looked-up rows follow the model's dtype
            self.out_dtype = dtype
        return self

    # the table is stored as a QuantLinear weight with N = num_embeddings, K = embedding_dim
    in_features = property(lambda self: self.embedding_dim)
    dequantized_weight = QuantLinear.dequantized_weight  # float32 [num_embeddings, embedding_dim]
    packed_bytes = QuantLinear.packed_bytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"ids: dtype {ids.dtype}, expected an integer tensor (torch.long)")
        flat = ids.reshape(-1)
        if self.weight_format.bits == 8:
            rows = self.qweight[flat].to(torch.float32) * self.scales[flat, None]
        else:
            codes = unpack_int4(self.qweight[flat]).to(torch.float32)  # [T, Kp]
            g = self.scales.shape[0]
            s = self.scales[:, flat].t()[..., None]  # [T, G, 1]
            z = self.zeros[:, flat].t()[..., None].to(torch.float32) if self.zeros is not None else INT4_SYM_ZERO
            rows = ((codes.reshape(len(flat), g, -1) - z) * s).reshape(len(flat), -1)[:, : self.embedding_dim]
        if self.embed_scale != 1.0:
            rows = rows * torch.tensor(self.embed_scale, dtype=rows.dtype)
        return rows.to(self.out_dtype).reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        scale = f", embed_scale={self.embed_scale:g}" if self.embed_scale != 1.0 else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, format={self.weight_format.name}, out_dtype={self.out_dtype}{scale}"


def embedding_scale(module: nn.Embedding) -> float:
    """The factor an embedding's forward multiplies its rows by: 1.0 for ``nn.Embedding`` itself, the
    ``embed_scale`` of a scaled word embedding (checked on a few rows).

    Raises:
        ValueError: a subclass whose forward is not the rows times one factor."""
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    scale = getattr(module, "scalar_embed_scale", None)
    if scale is None and isinstance(getattr(module, "embed_scale", None), (int, float, torch.Tensor)):
        scale = module.embed_scale
    scale = float(scale) if scale is not None and torch.as_tensor(scale).numel() == 1 else None
    if scale is not None:
        ids = torch.arange(min(8, module.num_embeddings), device=module.weight.device)
        with torch.no_grad():
            want = module.weight[ids] * torch.tensor(scale, dtype=module.weight.dtype, device=ids.device)
            if torch.equal(module(ids), want):
                return scale
    raise ValueError(f"{type(module).__name__}: an embedding whose forward is not its rows times one factor; "
                     "packing its table would drop what its forward adds")


class SparseLinear(_PackedLinear):
    """y = x @ W.T + b with a 2:4-sparse W stored compressed (docs/formats.md, "2:4 sparse").

    Buffers: ``values`` (the kept values: float [N, Kp / 2] in the layer's dtype, INT8 codes [N, Kp / 2]
    or packed INT4 codes [N, Kp / 4]), ``meta`` (uint8 [N, Kp / 8], 2-bit positions), ``scales``
    (float32, INT8/INT4 only) and ``zeros`` (INT4 asymmetric only); ``bias`` is a float parameter.
    ``weight_format`` is the kept values' format, or None when they stay float. ``.half()`` converts
    float values and the bias, never the scales.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        weight_format: WeightFormat | None = None,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        check_format(weight_format, allow_none=True)
        if weight_format is not None and weight_format.act_bits != 16:
            raise ValueError(f"weight_format={weight_format.name}: 2:4 layers take float activations (act_bits must be 16)")
        self.weight_format = weight_format
        n = out_features
        int4 = weight_format is not None and weight_format.bits == 4
        kp = sp24_padded_k(in_features, weight_format.group_size if int4 else None)
        self.group_size = (weight_format.group_size or kp) if int4 else 0
        if weight_format is None:
            values = torch.zeros(n, kp // 2, dtype=dtype, device=device)
        elif weight_format.bits == 8:
            values = torch.zeros(n, kp // 2, dtype=torch.int8, device=device)
        else:
            values = torch.zeros(n, kp // 4, dtype=torch.uint8, device=device)
        self.register_buffer("values", values)
        self.register_buffer("meta", torch.zeros(n, kp // 8, dtype=torch.uint8, device=device))
        if weight_format is None:
            scales = None
        elif weight_format.bits == 8:
            scales = torch.ones(n, dtype=torch.float32, device=device)
        else:
            scales = torch.ones(kp // self.group_size, n, dtype=torch.float32, device=device)
        self.register_buffer("scales", scales)
        zeros = torch.zeros(kp // self.group_size, n, dtype=torch.uint8, device=device) if int4 and not weight_format.symmetric else None
        self.register_buffer("zeros", zeros)
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, device=device)) if bias else None

    @property
    def format(self) -> str:
        return "2:4" if self.weight_format is None else f"2:4+{self.weight_format.name}"

    def dense_codes(self) -> QuantLinear:
        """A :class:`QuantLinear` holding the same quantized weight with the pruned positions as codes
        (INT8 code 0; INT4 the zero point, 8 when symmetric): ``dequantized_weight()`` is identical. For
        exporters whose formats store 2:4 weights dense (compressed-tensors)."""
        if self.weight_format is None:
            raise ValueError(f"{self.format}: float kept values have no codes; use dequantized_weight()")
        n, k = self.out_features, self.in_features
        out = QuantLinear(k, n, self.weight_format, bias=self.bias is not None,
                          dtype=self.bias.dtype if self.bias is not None else torch.float32, device=self.values.device)
        pos = sp24_positions(self.meta)
        if self.weight_format.bits == 8:
            dense = torch.zeros(n, pos.shape[1] * 2, dtype=torch.int8, device=self.values.device)
            dense.scatter_(1, pos, self.values)
            out.qweight, out.scales = dense[:, :k].contiguous(), self.scales.clone()
        else:
            kp = out.qweight.shape[1] * 2
            zero = (self.zeros.to(torch.int64).t() if self.zeros is not None
                    else torch.full((n, self.scales.shape[0]), INT4_SYM_ZERO, dtype=torch.int64, device=pos.device))
            dense = zero.repeat_interleave(self.group_size, dim=1)[:, : max(kp, pos.shape[1] * 2)]
            dense = dense.scatter(1, pos, unpack_int4(self.values).to(torch.int64))[:, :kp]
            out.qweight, out.scales = pack_int4(dense.to(torch.uint8)), self.scales.clone()
            if self.zeros is not None:
                out.zeros = self.zeros.clone()
        if self.bias is not None:
            out.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The dense float32 weight [out_features, in_features] (zeros at the pruned positions)."""
        return dequantize_sp24(self.values, self.meta, self.scales, self.zeros, self.group_size, self.in_features)

    def packed_bytes(self) -> int:
        """Bytes of the kept values, metadata, scales and zero points (bias not included)."""
        return sum(t.numel() * t.element_size() for t in (self.values, self.meta, self.scales, self.zeros) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: shape {tuple(x.shape)}, expected [..., {self.in_features}] (in_features)")
        x2d = x.reshape(-1, self.in_features)
        if ops.SP24_CPU_KERNELS and ops.eager_cpu(x2d, self._parameters.get("bias")):  # minus the dispatcher
            y = ops.run_sp24_module(self, x2d)
        else:
            y = ops.sp24_linear(x2d, self.values, self.meta, self.scales, self.zeros, self.group_size, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)
