"""The registered qruntime ops: one ``torch.library.custom_op`` each, backends hung off its handle.

* default: the PyTorch reference (:mod:`qruntime.ops.reference`), used on any device without a kernel;
* ``cpu``: the C++ kernels (csrc/, AVX-512 VNNI / AVX2 / scalar chosen at run time) when built;
* ``cuda``: the Triton kernels, registered by :mod:`qruntime.kernels` (the reference without Triton);
* fake: shape functions, so ``torch.compile`` and ``torch.export`` trace compressed models.

Call them as ``qruntime.ops.registry.w8a16_linear(...)`` or ``torch.ops.qruntime.w8a16_linear(...)``.

The CPU kernels read the weights in the CPU layouts of :mod:`qruntime.formats.cpu_layout`; the conversion runs
once per weight tensor (first CPU call) and is cached beside it, keyed on the tensor and its version
counter, so an in-place change of the weights is picked up. The cache holds one extra copy of the
packed weights (INT8: 1 byte a weight; INT4: half a byte; 2:4: the kept values, fp16 ones widened to
float32, plus the metadata).
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Callable, Iterator

import numpy as np
import torch

from . import reference
from .extension import extension
from qruntime.formats.cpu_layout import cpu_int4, cpu_int8, pad_channels
from qruntime.formats.cpu_layout import cpu_sp24 as sp24_layout
from qruntime.formats.packing import dequantize_int4, dequantize_int8, dequantize_sp24

__all__ = [
    "w8a16_linear",
    "w4a16_linear",
    "w8a8_linear",
    "sp24_linear",
    "cpu_backend",
    "cpu_isa",
    "cpu_bf16_rows",
    "supported_cpu_isas",
    "compiled_cpu_isas",
    "set_cpu_isa",
    "use_cpu_isa",
    "eager_cpu",
    "module_kernel_call",
    "cpu_w8a16",
    "cpu_w8a8",
    "cpu_w4a16",
    "cpu_sp24",
    "run_sp24_module",
    "module_tensors",
    "check_int8",
    "check_w4a16",
    "check_sp24",
    "sp24_kind",
    "layout_version",
    "cached_layout",
]


def _check_common(x: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    if x.dim() != 2:
        raise ValueError(f"x: shape {tuple(x.shape)}, expected 2 dims [M, K]")
    if not x.is_floating_point():
        raise TypeError(f"x: dtype {x.dtype} is not a floating-point dtype")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias: shape {tuple(bias.shape)}, expected ({n},)")


def check_int8(x, qweight, scales, bias) -> None:
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise TypeError(f"qweight: dtype {qweight.dtype}, shape {tuple(qweight.shape)}; expected int8 [N, K]")
    n, k = qweight.shape
    _check_common(x, bias, n)
    if x.shape[1] != k:
        raise ValueError(f"x: shape {tuple(x.shape)} has K={x.shape[1]}, qweight has K={k}")
    if tuple(scales.shape) != (n,):
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected ({n},)")


def check_w4a16(x, qweight, scales, zeros, group_size, bias) -> None:
    if qweight.dtype != torch.uint8 or qweight.dim() != 2:
        raise TypeError(f"qweight: dtype {qweight.dtype}, shape {tuple(qweight.shape)}; expected uint8 [N, Kp/2]")
    n, kp = qweight.shape[0], qweight.shape[1] * 2
    _check_common(x, bias, n)
    if group_size <= 0 or kp % group_size:
        raise ValueError(f"group_size={group_size}: must divide the padded K={kp}")
    if not kp - group_size < x.shape[1] <= kp:
        raise ValueError(f"x: K={x.shape[1]} does not match qweight's padded K={kp} (group_size={group_size})")
    g = kp // group_size
    if tuple(scales.shape) != (g, n):
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected ({g}, {n})")
    if zeros is not None and (zeros.dtype != torch.uint8 or tuple(zeros.shape) != (g, n)):
        raise ValueError(f"zeros: dtype {zeros.dtype}, shape {tuple(zeros.shape)}; expected uint8 ({g}, {n})")


def sp24_kind(values: torch.Tensor) -> str:
    """The kept-value format of 2:4 ``values``: ``"float"``, ``"int8"`` or ``"int4"``."""
    return "int8" if values.dtype == torch.int8 else ("int4" if values.dtype == torch.uint8 else "float")


def check_sp24(x, values, meta, scales, zeros, group_size, bias) -> None:
    if meta.dtype != torch.uint8 or meta.dim() != 2:
        raise TypeError(f"meta: dtype {meta.dtype}, shape {tuple(meta.shape)}; expected uint8 [N, Kp/8]")
    n, kp = meta.shape[0], meta.shape[1] * 8
    _check_common(x, bias, n)
    kind = sp24_kind(values) if values.dtype in (torch.int8, torch.uint8) or values.is_floating_point() else None
    if kind is None:
        raise TypeError(f"values: dtype {values.dtype}; expected float, int8 (INT8 codes) or uint8 (packed INT4 codes)")
    width = kp // 4 if kind == "int4" else kp // 2
    if tuple(values.shape) != (n, width):
        raise ValueError(f"values: shape {tuple(values.shape)}, expected ({n}, {width}) for meta {tuple(meta.shape)} ({kind})")
    if kind == "int4" and (group_size <= 0 or kp % group_size):
        raise ValueError(f"group_size={group_size}: must divide the padded K={kp}")
    # K is padded to a multiple of 8 (and of an INT4 group): less than one multiple short of Kp
    multiple = max(8, group_size) if kind == "int4" else 8
    if kp == 0 or not kp - multiple < x.shape[1] <= kp:
        raise ValueError(f"x: K={x.shape[1]} does not match the 2:4 tensors' padded K={kp} (group_size={group_size})")
    if kind == "float":
        if scales is not None or zeros is not None:
            raise ValueError("scales/zeros given with float values: only INT8/INT4 kept values have scales")
        return
    if scales is None or scales.dtype != torch.float32:
        raise TypeError(f"scales: {None if scales is None else scales.dtype}; {kind} values need float32 scales")
    expected = (n,) if kind == "int8" else (kp // group_size, n)
    if tuple(scales.shape) != expected:
        raise ValueError(f"scales: shape {tuple(scales.shape)}, expected {expected}")
    if zeros is not None and (kind == "int8" or zeros.dtype != torch.uint8 or tuple(zeros.shape) != expected):
        raise ValueError(f"zeros: dtype {zeros.dtype}, shape {tuple(zeros.shape)}; expected uint8 {expected} (INT4 asymmetric only)")


@torch.library.custom_op("qruntime::w8a16_linear", mutates_args=())
def w8a16_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ (qweight int8 [N, K] * scales f32 [N]).T + bias; output dtype = x.dtype."""
    check_int8(x, qweight, scales, bias)
    return reference.w8a16_linear(x, qweight, scales, bias)


@torch.library.custom_op("qruntime::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant_int4(qweight u8 [N, Kp/2], scales [G, N], zeros [G, N] | None).T + bias."""
    check_w4a16(x, qweight, scales, zeros, group_size, bias)
    return reference.w4a16_linear(x, qweight, scales, zeros, group_size, bias)


@torch.library.custom_op("qruntime::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Dynamic per-token INT8 activations x INT8 per-channel weights (reference.w8a8_linear)."""
    check_int8(x, qweight, scales, bias)
    return reference.w8a8_linear(x, qweight, scales, bias)


@torch.library.custom_op("qruntime::sp24_linear", mutates_args=())
def sp24_linear(
    x: torch.Tensor,
    values: torch.Tensor,
    meta: torch.Tensor,
    scales: torch.Tensor | None,
    zeros: torch.Tensor | None,
    group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] @ expand(values, meta).T + bias for a 2:4-sparse weight whose kept values are
    float, INT8 or INT4 (reference.sp24_linear, docs/formats.md)."""
    check_sp24(x, values, meta, scales, zeros, group_size, bias)
    return reference.sp24_linear(x, values, meta, scales, zeros, group_size, bias)


@sp24_linear.register_fake
def _(x, values, meta, scales, zeros, group_size, bias):
    return x.new_empty((x.shape[0], meta.shape[0]))


@w8a16_linear.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@w8a8_linear.register_fake
def _(x, qweight, scales, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


@w4a16_linear.register_fake
def _(x, qweight, scales, zeros, group_size, bias):
    return x.new_empty((x.shape[0], qweight.shape[0]))


# Autograd with respect to x and bias (the packed weights are constants), so adapters or a distillation
# step can train around a quantized layer. W8A8 passes the gradient straight through its activation
# rounding (the usual straight-through estimator).
def _int8_setup(ctx, inputs, output):
    x, qweight, scales, bias = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.has_bias = bias is not None


def _int8_backward(ctx, grad):
    qweight, scales = ctx.saved_tensors
    w = dequantize_int8(qweight, scales).to(grad.dtype)
    return grad @ w, None, None, grad.sum(0) if ctx.has_bias else None


def _w4a16_setup(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size, ctx.in_features, ctx.has_bias = group_size, x.shape[1], bias is not None


def _w4a16_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    w = dequantize_int4(qweight, scales, zeros, ctx.group_size, ctx.in_features).to(grad.dtype)
    return grad @ w, None, None, None, None, grad.sum(0) if ctx.has_bias else None


def _sp24_setup(ctx, inputs, output):
    x, values, meta, scales, zeros, group_size, bias = inputs
    ctx.save_for_backward(values, meta, scales, zeros)
    ctx.group_size, ctx.in_features, ctx.has_bias = group_size, x.shape[1], bias is not None


def _sp24_backward(ctx, grad):
    values, meta, scales, zeros = ctx.saved_tensors
    w = dequantize_sp24(values, meta, scales, zeros, ctx.group_size, ctx.in_features).to(grad.dtype)
    return grad @ w, None, None, None, None, None, grad.sum(0) if ctx.has_bias else None


sp24_linear.register_autograd(_sp24_backward, setup_context=_sp24_setup)
w8a16_linear.register_autograd(_int8_backward, setup_context=_int8_setup)
w8a8_linear.register_autograd(_int8_backward, setup_context=_int8_setup)
w4a16_linear.register_autograd(_w4a16_backward, setup_context=_w4a16_setup)


# ---- CPU: the C++ kernels over cached CPU layouts ---------------------------------------------------

_cache: dict[int, tuple[weakref.ref, dict]] = {}
_cache_lock = threading.Lock()


def layout_version(t: torch.Tensor | None) -> tuple:
    if t is None:
        return (None,)
    try:
        return (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors have no version counter (and cannot be changed in place)
        return (t.data_ptr(), -1)


def cached_layout(t: torch.Tensor, kind: object, versions: tuple, build: Callable[[], object]) -> object:
    """The CPU layout ``kind`` of tensor ``t``, built once and rebuilt when ``versions`` change.

    Entries live as long as ``t`` (a weak reference drops them with it)."""
    ident = id(t)
    with _cache_lock:
        hit = _cache.get(ident)
        if hit is not None and hit[0]() is t:
            entry = hit[1].get(kind)
            if entry is not None and entry[0] == versions:
                return entry[1]
    value = build()
    with _cache_lock:
        hit = _cache.get(ident)
        if hit is None or hit[0]() is not t:
            hit = (weakref.ref(t, lambda _, ident=ident: _cache.pop(ident, None)), {})
            _cache[ident] = hit
        hit[1][kind] = (versions, value)
    return value


def _bias_array(bias: torch.Tensor | None):
    """float32 bias padded to the 32-channel blocks, as a numpy array (cached per bias tensor)."""
    if bias is None:
        return None
    return cached_layout(bias, "bias", (layout_version(bias), bias.dtype), lambda: pad_channels(bias).numpy())


def _np(layout) -> dict:
    """The tensors of a CPU layout as numpy arrays (views: no copies), ready for the extension."""
    return {k: v.numpy() for k, v in vars(layout).items() if isinstance(v, torch.Tensor)}


def _kernel_call(kind: str, qweight, scales, zeros, group_size, bias) -> tuple[str, tuple]:
    """(extension function, its arguments between x and n) for ``kind`` in w8a16 / w8a8 / w4a16.

    The CPU layout comes from the per-weight cache, so the op and the module paths share one copy."""
    versions = (layout_version(qweight), layout_version(scales), layout_version(zeros))
    b = _bias_array(bias)
    if kind == "w4a16":
        p = cached_layout(qweight, kind, versions, lambda: _np(cpu_int4(qweight.contiguous(), scales, zeros)))
        return "w4a16_gemm", (p["panels"], p["s"], p["zs"], group_size, b)
    act_bits = 8 if kind == "w8a8" else 16
    p = cached_layout(qweight, kind, versions, lambda: _np(cpu_int8(qweight.contiguous(), scales, act_bits)))
    if kind == "w8a8":
        return "w8a8_gemm", (p["vnni"], p["wsum"], p["scales"], b)
    return "w8a16_gemm", (p["panels"], p["scales"], b)


def _launch(call: tuple[str, tuple], x: torch.Tensor, n: int) -> torch.Tensor:
    """Runs a :func:`_kernel_call` on ``x`` [M, K]; the output has x's dtype."""
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    out = np.empty((x.shape[0], n), dtype=np.float32)  # (half the cost of torch.empty + .numpy())
    if x.shape[0]:
        getattr(extension(), call[0])(xf.numpy(), *call[1], n, out, torch.get_num_threads())
    y = torch.from_numpy(out)
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def cpu_w8a16(x, qweight, scales, bias):
    """The ``cpu`` kernel of :func:`w8a16_linear` (C++)."""
    check_int8(x, qweight, scales, bias)
    return _launch(_kernel_call("w8a16", qweight, scales, None, 0, bias), x, qweight.shape[0])


def cpu_w8a8(x, qweight, scales, bias):
    """The ``cpu`` kernel of :func:`w8a8_linear` (C++)."""
    check_int8(x, qweight, scales, bias)
    return _launch(_kernel_call("w8a8", qweight, scales, None, 0, bias), x, qweight.shape[0])


def cpu_w4a16(x, qweight, scales, zeros, group_size, bias):
    """The ``cpu`` kernel of :func:`w4a16_linear` (C++)."""
    check_w4a16(x, qweight, scales, zeros, group_size, bias)
    return _launch(_kernel_call("w4a16", qweight, scales, zeros, group_size, bias), x, qweight.shape[0])


def _sp24_arrays(layout) -> dict:
    """The numpy arrays the extension's ``sp24_gemm`` takes (bf16 values as their int16 bit patterns)."""
    values = layout.values.view(torch.int16) if layout.values.dtype == torch.bfloat16 else layout.values
    return {
        "values": values.numpy(),
        "meta": layout.meta.numpy(),
        "s": None if layout.s is None else layout.s.numpy(),
        "zs": None if layout.zs is None else layout.zs.numpy(),
    }


def _sp24_call(values, meta, scales, zeros, group_size, bias) -> tuple[str, tuple] | None:
    """(extension function, its arguments between x and n) of a 2:4 weight, or None where the C++ kernel
    does not apply: INT4 groups that are not a multiple of 4 columns (legal in the format, never made by
    the quantizers; the kernel reads whole groups of 4). The reference runs those."""
    if values.dtype == torch.uint8 and group_size % 4:
        return None
    versions = (layout_version(values), layout_version(meta), layout_version(scales), layout_version(zeros), group_size)
    p = cached_layout(values, "sp24", versions,
                lambda: _sp24_arrays(sp24_layout(values, meta, scales, zeros, group_size)))
    return "sp24_gemm", (p["values"], p["meta"], p["s"], p["zs"], group_size, _bias_array(bias))


def cpu_sp24(x, values, meta, scales, zeros, group_size, bias):
    """The ``cpu`` kernel of :func:`sp24_linear` (C++ over the CPU layout ``cpu_layout.CpuSp24``)."""
    check_sp24(x, values, meta, scales, zeros, group_size, bias)
    # float64 activations get float64 math (the kernel computes in float32)
    call = None if x.dtype == torch.float64 else _sp24_call(values, meta, scales, zeros, group_size, bias)
    if call is None:
        return reference.sp24_linear(x, values, meta, scales, zeros, group_size, bias)
    return _launch(call, x, meta.shape[0])


CPU_KERNELS = extension() is not None
# an extension built before the 2:4 kernel existed has no sp24_gemm: 2:4 then runs the reference
SP24_CPU_KERNELS = CPU_KERNELS and hasattr(extension(), "sp24_gemm")
if CPU_KERNELS:
    w8a16_linear.register_kernel("cpu")(cpu_w8a16)
    w8a8_linear.register_kernel("cpu")(cpu_w8a8)
    w4a16_linear.register_kernel("cpu")(cpu_w4a16)
if SP24_CPU_KERNELS:
    sp24_linear.register_kernel("cpu")(cpu_sp24)


def module_tensors(module, names: tuple[str, ...]) -> tuple:
    """The module's parameters / buffers / plain attributes ``names`` (None where unset), read from its
    dicts: at decode a layer call is a few microseconds, and each ``nn.Module.__getattr__`` costs ~0.6."""
    params, buffers, attrs = module._parameters, module._buffers, module.__dict__
    return tuple(params[n] if n in params else buffers[n] if n in buffers else attrs.get(n) for n in names)


def run_checked_module(module, x2d: torch.Tensor) -> torch.Tensor:
    """The CPU kernel of a :class:`~qruntime.nn.modules.QuantLinear` for ``x2d`` [M, in_features] (float).

    The module's buffers were validated when it was built, and ``x2d`` comes from a reshape to
    ``in_features``: the per-call argument checks of the public ops are skipped, and the kernel call
    is kept on the module, rebuilt when a buffer is replaced or changed in place (e.g. by
    ``load_state_dict``)."""
    if not x2d.is_floating_point():
        raise TypeError(f"x: dtype {x2d.dtype} is not a floating-point dtype")
    q, s, z, b = module_tensors(module, ("qweight", "scales", "zeros", "bias"))
    try:
        key = (q.data_ptr(), q._version, s.data_ptr(), s._version, None if z is None else (z.data_ptr(), z._version),
               None if b is None else (b.data_ptr(), b._version, b.dtype))
    except RuntimeError:  # inference tensors have no version counter: nothing is kept on the module
        key = None
    plan = module.__dict__.get("_cpu_plan")
    if plan is None or key is None or plan[0] != key:
        kind = "w4a16" if module.weight_format.bits == 4 else ("w8a8" if module.weight_format.act_bits == 8 else "w8a16")
        plan = (key, _kernel_call(kind, q, s, z, module.group_size, b))
        if key is not None:
            module.__dict__["_cpu_plan"] = plan
    return _launch(plan[1], x2d, module.out_features)


def run_sp24_module(module, x2d: torch.Tensor) -> torch.Tensor:
    """The CPU kernel of a 2:4 module (``SparseLinear``: buffers ``values``, ``meta``, ``scales``,
    ``zeros``, attributes ``group_size``, ``bias``, ``out_features``) for ``x2d`` [M, in_features] (float).

    As :func:`run_checked_module`: the buffers were validated when the module was built, the per-call
    checks are skipped, and the kernel call is kept on the module until a buffer is replaced or changed
    in place."""
    if not x2d.is_floating_point():
        raise TypeError(f"x: dtype {x2d.dtype} is not a floating-point dtype")
    v, mt, s, z, b = module_tensors(module, ("values", "meta", "scales", "zeros", "bias"))
    try:
        key = tuple(None if t is None else (t.data_ptr(), t._version) for t in (v, mt, s, z)) + (
            None if b is None else (b.data_ptr(), b._version, b.dtype), module.group_size)
    except RuntimeError:  # inference tensors have no version counter: nothing is kept on the module
        key = None
    plan = module.__dict__.get("_cpu_sp24_plan")
    if plan is None or key is None or plan[0] != key:
        plan = (key, _sp24_call(v, mt, s, z, module.group_size, b))
        if key is not None:
            module.__dict__["_cpu_sp24_plan"] = plan
    if plan[1] is None or x2d.dtype == torch.float64:
        return reference.sp24_linear(x2d, v, mt, s, z, module.group_size, b)
    return _launch(plan[1], x2d, module.out_features)


def module_kernel_call(module) -> tuple[Callable, tuple] | None:
    """The C++ kernel of a packed Linear module and its arguments between ``x`` and ``n``, for callers that
    run one layer many times on preallocated buffers: ``fn(x, *args, n, out, threads)`` with ``x`` float32
    [M, in_features] and ``out`` float32 [M, n] numpy arrays (``n`` = out_features). The module is a
    QuantLinear (buffers ``qweight``, ``scales``, ``zeros``) or a 2:4 SparseLinear (``values``, ``meta``,
    ...). None where no C++ kernel applies (no extension, a non-CPU tensor, INT4 2:4 groups the kernel
    cannot read). The CPU layout is built now, and kept as long as the returned arguments are."""
    if not CPU_KERNELS:
        return None
    if "qweight" in module._buffers:
        q, s, z, b = module_tensors(module, ("qweight", "scales", "zeros", "bias"))
        if not q.is_cpu:
            return None
        kind = "w4a16" if module.weight_format.bits == 4 else ("w8a8" if module.weight_format.act_bits == 8 else "w8a16")
        call = _kernel_call(kind, q, s, z, module.group_size, b)
    elif "values" in module._buffers and SP24_CPU_KERNELS:
        v, mt, s, z, b = module_tensors(module, ("values", "meta", "scales", "zeros", "bias"))
        call = _sp24_call(v, mt, s, z, module.group_size, b) if v.is_cpu else None
    else:
        return None
    return None if call is None else (getattr(extension(), call[0]), call[1])


def eager_cpu(x: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """True when a module may call the ``cpu`` kernels directly instead of through the dispatcher.

    Same kernels, minus ~10 us of dispatch per call (it matters for small layers at decode). Only in
    eager mode (not under torch.compile/export), on CPU tensors, and when no gradient is needed.
    """
    return (
        CPU_KERNELS
        and x.is_cpu
        and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        and not torch.compiler.is_compiling()
    )


# ---- which CPU path runs ---------------------------------------------------------------------------

def cpu_isa() -> str | None:
    """The ISA level the C++ kernels run (``"amx_int8"``, ``"avx512_bf16"``, ``"avx512_vnni"``, ``"avx2"``,
    ``"scalar"``; ``"amx_bf16"`` when forced), or None."""
    ext = extension()
    return None if ext is None else ext.isa()


def cpu_bf16_rows() -> int | None:
    """From how many rows (M) the C++ W8A16 / W4A16 kernels multiply in bf16 on the current level: x and
    the dequantized weight rounded to bf16 as under ``torch.autocast`` (an INT8 code is exact in bf16, its
    scale applied to the fp32 sum), fp32 accumulation. None: fp32 products at every M (a level without
    AVX512-BF16, or no extension)."""
    ext = extension()
    rows = 0 if ext is None else ext.bf16_rows()
    return rows or None


def supported_cpu_isas() -> list[str]:
    """ISA levels this CPU can run (empty without the extension)."""
    ext = extension()
    return [] if ext is None else list(ext.supported_isas())


def compiled_cpu_isas() -> list[str]:
    """ISA levels built into the C++ extension, whether or not this CPU runs them (empty without it)."""
    ext = extension()
    return [] if ext is None else list(ext.compiled_isas())


def set_cpu_isa(name: str) -> None:
    """Forces an ISA level for the C++ kernels; raises ValueError if unknown or unsupported here."""
    ext = extension()
    if ext is None:
        raise RuntimeError("set_cpu_isa: the C++ extension is not available (CPU ops use the reference)")
    ext.set_isa(name)


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Runs the block with the C++ kernels forced to ``name``, then restores the previous level."""
    previous = cpu_isa()
    set_cpu_isa(name)
    try:
        yield
    finally:
        set_cpu_isa(previous)


def cpu_backend() -> str:
    """Which implementation the CPU ops run: ``"cpp:<isa>"`` (the extension) or ``"reference"``."""
    isa = cpu_isa()
    return "reference" if isa is None else f"cpp:{isa}"
