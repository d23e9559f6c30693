"""Calibration: the statistics each method needs, collected with forward hooks (`stats`: activation
abs-max, input norms, Hessians X^T X), and the block-by-block driver that calibrates each block on the
outputs of the blocks before it as quantized (`blockwise`).

Imports: `qruntime.plumbing`.
"""
