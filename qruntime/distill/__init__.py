"""Depth distillation: which blocks a smaller student keeps, the student, the losses and the trainer
(`trainer`; its settings in `config`: DistillConfig).

Imports: `qruntime.plumbing`. Not quant or sparse: the algorithms meet in the pipeline.
"""
