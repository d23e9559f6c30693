"""Evaluation and the demo: perplexity and encoder tasks (`evaluate`), speed comparisons (`speed`), the
offline demo models (`models`) and texts (`data`).

Imports: `qruntime.calibration`, `qruntime.io`, `qruntime.plumbing`. Never imported by the library.
"""
