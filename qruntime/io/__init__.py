"""Artifacts: saving and loading a compressed model bit for bit (`checkpoint`), and export to the
compressed-tensors format that vLLM loads (`export`).

Imports: `qruntime.nn`, `qruntime.formats` and `qruntime.version`.
"""
