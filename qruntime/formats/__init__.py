"""Packed weight formats, bit by bit (docs/formats.md): INT8 per channel, INT4 in groups, 2:4 sparse
(`packing`), and the re-blocked layouts the CPU kernels read (`cpu_layout`).

Imports: nothing from qruntime (torch only).
"""
