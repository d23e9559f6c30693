"""2:4 structured sparsity: masks by magnitude, Wanda or SparseGPT (`prune`), and a pruned weight packed
into a SparseLinear (`pack`).

Imports: `qruntime.quant` (GPTQ, for SparseGPT's update and the quantized kept values), `qruntime.calibration`,
`qruntime.nn`, `qruntime.formats`.
"""
