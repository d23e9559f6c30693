"""Loads the C++ CPU extension once; a missing build degrades to the reference with one warning."""
from __future__ import annotations

import functools
import os
import warnings
from types import ModuleType

DISABLE_ENV = "QRUNTIME_DISABLE_EXTENSION"


@functools.lru_cache(maxsize=None)
def extension() -> ModuleType | None:
    """The compiled ``qruntime._C`` module, or None (disabled by the environment, or not built)."""
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
    return _C
