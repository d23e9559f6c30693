"""Evaluation and the demo: perplexity and encoder tasks (`evaluate`), speed comparisons on the model's own forward or qruntime's decoder (`speed`), the
offline demo models (`models`) and texts (`data`).

Imports: `qruntime.calibration`, `qruntime.io`, `qruntime.plumbing`, `qruntime.runtime`. Never imported by the library.
"""
