"""qruntime: INT8/INT4 quantization, 2:4 structured sparsity and depth distillation for HuggingFace
Transformers, behind one call::

    model, report = qruntime.compress(model, "w8a16")
    print(report)

Importing qruntime never touches CUDA and compiles nothing.
"""
from .pipeline.compress import compress
from .nn.targets import select_targets
from .io.checkpoint import CheckpointError, load, save
from .distill.config import DistillConfig
from .formats.packing import WeightFormat
from .quant.config import QuantConfig
from .quant.linear import quantize_linear
from .recipes.config import CompressConfig, SparsityConfig
from .recipes.presets import PRESETS
from .distill.student import make_student
from .distill.trainer import DistillReport, distill
from .io.export import export_compressed_tensors
from .nn.modules import QuantEmbedding, QuantLinear, SparseLinear
from .sparse.prune import prune_model
from .ops.registry import cpu_backend
from .ops import triton_backend  # noqa: F401  registers the Triton kernels as the ops' CUDA implementations (imports no Triton)
from .plumbing.report import CompressReport
from .runtime import Decoder, UnsupportedModelError, generate

from .version import __version__

__all__ = [
    "compress",
    "select_targets",
    "CompressConfig",
    "QuantConfig",
    "WeightFormat",
    "quantize_linear",
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
    "Decoder",
    "generate",
    "UnsupportedModelError",
    "__version__",
]
