"""Loads the C++ CPU extension once; a missing build degrades to the reference with one warning.

Environment:
    QRUNTIME_DISABLE_EXTENSION=1   never load it (CPU ops run the PyTorch reference).
    QRUNTIME_CPU_ISA=<level>       force the kernels' ISA level: ``scalar``, ``avx2``, ``avx512_vnni``,
                                   ``avx512_bf16``, ``amx_int8`` or ``amx_bf16``. Unset, the highest level
                                   this CPU and OS run is used (``amx_int8`` where the OS grants AMX tiles),
                                   never ``amx_bf16`` (opt-in until validated on AMX hardware). A level
                                   this CPU cannot run is refused with a warning (the best supported level
                                   runs instead). From ``avx512_bf16`` on, W8A16 and W4A16 multiply in
                                   bf16 (fp32 sums) at 16 rows or more: force ``avx512_vnni`` for fp32
                                   products at every size.
"""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

DISABLE_ENV = "QRUNTIME_DISABLE_EXTENSION"
ISA_ENV = "QRUNTIME_CPU_ISA"


@functools.lru_cache(maxsize=None)
def extension() -> ModuleType | None:
    """The compiled ``qruntime.ops._C`` module, or None (disabled by the environment, or not built)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None
    try:
        from . import _C
    except ImportError as exc:
        warnings.warn(
            f"qruntime: C++ CPU extension not available ({exc}); CPU ops use the PyTorch reference. "
            "Reinstall with `pip install -e .` and a C++ compiler to build it.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    forced = os.environ.get(ISA_ENV, "").strip().lower()
    if forced:
        try:
            _C.set_isa(forced)
        except ValueError as exc:
            warnings.warn(f"qruntime: {ISA_ENV}={forced!r} ignored: {exc}", RuntimeWarning, stacklevel=2)
    return _C
