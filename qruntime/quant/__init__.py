"""Quantization algorithms: the recipe of one layer (`config`: QuantConfig), GPTQ (`gptq`), range
clipping (`clip`), AWQ (`awq`) and SmoothQuant (`smoothquant`) scaling folded into the norms, block output
tuning (`tune`) and the accuracy budget (`budget`).

Imports: `qruntime.calibration`, `qruntime.nn`, `qruntime.ops`, `qruntime.formats`, `qruntime.plumbing`.
Not sparse or distill: the algorithms meet in the pipeline.
"""
