"""Compressed modules that know only their packed format (`modules`: QuantLinear, QuantEmbedding,
SparseLinear), and which layers of a model a recipe converts, with the error of a converted one
(`targets`).

Imports: `qruntime.ops`, `qruntime.formats`, `qruntime.plumbing`.
"""
