"""Triton GPU kernels of qruntime, imported as ``qruntime.kernels`` (the top-level name ``kernels`` is
taken on PyPI). One file per kernel family; each registers itself as the ``cuda`` implementation of
its op in :mod:`qruntime.ops`. No kernel has landed yet: on CUDA the ops run their PyTorch reference.
"""
