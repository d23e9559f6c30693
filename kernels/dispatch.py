"""Which kernel path runs a quantized matmul, chosen by M (and measured on the GPU that runs it).

Paths: ``splitk`` (small M: 16-row tiles, K split over programs), ``gemm`` (tiled, larger M) and, for the
weight-only formats, ``dequant`` (weights expanded once to the activation dtype, then cuBLAS: the very
large M where the GEMM is compute-bound). 2:4-sparse weights (kind ``sp24``) have one more, ``sparse``:
PyTorch's semi-structured sparse tensors (cuSPARSELt / CUTLASS), a candidate at large M where the
launcher says it can run.

On a CUDA device, the first call for a (format, weight shape, dtype, M bucket) times every candidate path
on the real inputs with ``triton.testing.do_bench`` (median) and keeps the fastest for that bucket; later
calls are a dictionary lookup. Under the interpreter, on CPU tensors, or while a CUDA graph is being
captured (no timing possible), the rule of thumb :func:`heuristic` decides.

Environment:
    QRUNTIME_TRITON_PATH=auto|heuristic|splitk|gemm|dequant|sparse   (default auto: measured as above;
    ``sparse`` applies to 2:4 weights only)
"""
from __future__ import annotations

import os
import threading
from typing import Callable

import torch

from ._common import interpreting, m_bucket

PATHS = ("splitk", "gemm", "dequant")
SP24_PATHS = PATHS + ("sparse",)  # 2:4 weights: + PyTorch's semi-structured sparse tensors
PATH_ENV = "QRUNTIME_TRITON_PATH"
KINDS = ("w8a16", "w4a16", "w8a8", "sp24")

_chosen: dict[tuple, tuple[str, dict[str, float]]] = {}
_lock = threading.Lock()


def check_path(kind: str, path: str) -> None:
    if kind == "sp24":
        if path not in SP24_PATHS:
            raise ValueError(f"path={path!r}: expected one of {SP24_PATHS}")
        return
    if path == "sparse":
        raise ValueError(f"path='sparse': only 2:4 weights (sp24_linear) have the semi-structured path, not {kind}")
    if path not in PATHS:
        raise ValueError(f"path={path!r}: expected one of {PATHS}")
    if kind == "w8a8" and path == "dequant":
        raise ValueError("path='dequant': W8A8 has no dequantize path (its activations are quantized too)")


def check_devices(op: str, x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Every tensor on x's device (a clear error instead of an illegal memory access)."""
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, x is on {x.device}; move them to one device")


def candidates(kind: str, m: int) -> tuple[str, ...]:
    """The paths worth timing for M rows."""
    paths = (["splitk"] if m <= 64 else []) + ["gemm"]
    if kind != "w8a8" and m >= 256:
        paths.append("dequant")
    if kind == "sp24" and m >= 256:
        paths.append("sparse")  # where the launcher finds it available (else it drops it)
    return tuple(paths)


def heuristic(kind: str, m: int) -> str:
    """The path without measurement: split-K for decode-sized M, the tiled GEMM otherwise."""
    return "splitk" if m <= 16 else "gemm"


def _mode() -> str:
    mode = os.environ.get(PATH_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "heuristic") + SP24_PATHS:
        raise ValueError(f"{PATH_ENV}={mode!r}: expected auto, heuristic or one of {SP24_PATHS}")
    return mode


def resolve(kind: str, key: tuple, x: torch.Tensor, path: str | None, run: Callable[[str], torch.Tensor],
            paths: tuple[str, ...] | None = None) -> str:
    """The launcher's path: ``path`` when given (checked), else :func:`choose`'s."""
    path = choose(kind, key, x, run, paths) if path is None else path
    check_path(kind, path)
    return path


def choose(kind: str, key: tuple, x: torch.Tensor, run: Callable[[str], torch.Tensor],
           paths: tuple[str, ...] | None = None) -> str:
    """The path for ``x`` [M, K]; ``run(path)`` computes the product on that path (used for timing).
    ``paths``: the candidates to time, when the launcher narrows :func:`candidates` (default: all of them)."""
    global _last
    _last = path = _choose(kind, key, x, run, paths)
    return path


def _choose(kind, key, x, run, paths=None) -> str:
    m = x.shape[0]
    mode = _mode()
    if mode in SP24_PATHS:  # forced (check_path refuses 'sparse' for the other kinds)
        return mode
    if (
        mode == "heuristic"
        or interpreting()
        or x.device.type != "cuda"
        or torch.cuda.is_current_stream_capturing()
    ):
        return heuristic(kind, m)
    full = (kind, key, m_bucket(m), x.device.index)
    hit = _chosen.get(full)
    if hit is not None:
        return hit[0]
    from triton.testing import do_bench

    paths = candidates(kind, m) if paths is None else paths
    times = {p: do_bench(lambda p=p: run(p), warmup=5, rep=20, return_mode="median") for p in paths}
    best = min(times, key=times.get)
    with _lock:
        _chosen[full] = (best, times)
    return best


_last: str | None = None


def last_path() -> str | None:
    """The path the most recent dispatched call took (for benchmarks and reports)."""
    return _last


def chosen() -> dict[tuple, tuple[str, dict[str, float]]]:
    """What the measured dispatch picked so far: (kind, key, M bucket, device) -> (path, ms per path)."""
    with _lock:
        return dict(_chosen)


def reset() -> None:
    """Forgets the measured choices (e.g. after changing clocks or the GPU)."""
    with _lock:
        _chosen.clear()
