"""qruntime: INT8/INT4 quantization, 2:4 structured sparsity and depth distillation for HuggingFace
Transformers, behind one call::

    model, report = qruntime.compress(model, "w8a16")
    print(report)

Importing qruntime never touches CUDA and compiles nothing.
"""
from .pipeline import compress
from .targets import select_targets
from .checkpoint import CheckpointError, load, save
from .config import CompressConfig, DistillConfig, QuantConfig, SparsityConfig, PRESETS
from .distill import DistillReport, distill, make_student
from .export import export_compressed_tensors
from .nn import QuantEmbedding, QuantLinear, SparseLinear
from .prune import prune_model
from .ops import cpu_backend
from . import triton_backend  # noqa: F401  registers the Triton kernels as the ops' CUDA implementations (imports no Triton)
from .report import CompressReport

from .version import __version__

__all__ = [
    "compress",
    "select_targets",
    "CompressConfig",
    "QuantConfig",
    "DistillConfig",
    "SparsityConfig",
    "SparseLinear",
    "prune_model",
    "distill",
    "make_student",
    "DistillReport",
    "PRESETS",
    "QuantLinear",
    "QuantEmbedding",
    "save",
    "load",
    "CheckpointError",
    "export_compressed_tensors",
    "CompressReport",
    "cpu_backend",
    "__version__",
]
