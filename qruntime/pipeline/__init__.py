"""`compress()`: the stages (validate, select, smooth/AWQ, distill, prune, calibrate and quantize, tune,
budget, swap, report) run in order over one state object (`compress`).

Imports: `qruntime.calibration`, `qruntime.distill`, `qruntime.nn`, `qruntime.ops`, `qruntime.plumbing`,
`qruntime.quant`, `qruntime.recipes`, `qruntime.sparse`; nothing above it (io, eval, the command line).
"""
