"""What :func:`qruntime.compress` does to a model: :class:`CompressConfig`, composed of each algorithm's own
config (:class:`~qruntime.quant.config.QuantConfig`, :class:`~qruntime.distill.config.DistillConfig`,
:class:`SparsityConfig`), and the recipe's data-free variant. Preset names are read in
:mod:`qruntime.recipes.presets`.

Imports: the algorithms' configs and :mod:`qruntime.nn.targets` (the default exclusions).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from qruntime.distill.config import DistillConfig
from qruntime.nn.targets import DEFAULT_EXCLUDE
from qruntime.quant.config import QuantConfig, check_tune, tune_suffix
from qruntime.sparse.prune import PRUNE_METHODS

__all__ = ["CompressConfig", "SparsityConfig", "DEFAULT_SPARSE_TUNE_STEPS", "data_free_variant"]

# steps of "-tune" without a number for SparsityConfig.tune_steps (2:4 kept weights: more free values, more
# steps before the held-out error stops falling)
DEFAULT_SPARSE_TUNE_STEPS = 128


@dataclass(frozen=True)
class SparsityConfig:
    """2:4 structured sparsity of the Linear weights (:mod:`qruntime.sparse.prune`).

    Attributes:
        method: how each group's 2 kept weights are chosen: ``"sparsegpt"`` (default; Hessian-aware,
            updates the kept weights; needs calibration data), ``"wanda"`` (|W| x input norm; needs
            calibration data) or ``"magnitude"`` (no data).
        damp: SparseGPT's dampening of the Hessian diagonal, as a fraction of its mean.
        block_size: SparseGPT's lazy-update block (a multiple of 4).
        sequential: SparseGPT / Wanda calibrate block by block: each block's layers are pruned with
            statistics of the inputs they see once the blocks before them are pruned (as in the
            SparseGPT paper; one dense forward plus two passes per block). False: every layer's
            statistics come from one pass of the dense model (faster, less accurate).
        skip: fnmatch patterns of target layers kept dense (still quantized if the recipe quantizes),
            e.g. sensitive layers; each is listed in the report.
        recover: a knowledge-distillation fine-tune of the pruned model against the original with the
            masks fixed (:func:`qruntime.distill`; needs training data), or None.
        tune_steps: after each block is pruned, its kept weights are tuned for this many Adam steps (one
            calibration window each, masks fixed) to bring the block's output closer to the float
            block's (:mod:`qruntime.quant.tune`; kept only if the block's error on held-out calibration windows
            went down); before any quantization of the kept values. 0: off. Needs a calibrated
            ``method`` and ``sequential``.
        tune_lr: the Adam learning rate of that tuning, on each weight's change relative to its row's
            root mean square.
    """

    method: str = "sparsegpt"
    damp: float = 0.01
    block_size: int = 128
    sequential: bool = True
    skip: tuple[str, ...] = ()
    recover: DistillConfig | None = None
    tune_steps: int = 0
    tune_lr: float = 3e-3

    def __post_init__(self) -> None:
        if self.method not in PRUNE_METHODS:
            raise ValueError(f"method={self.method!r}: must be one of {sorted(PRUNE_METHODS)}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp}: must be in [0, 1)")
        if self.block_size < 4 or self.block_size % 4:
            raise ValueError(f"block_size={self.block_size}: must be a positive multiple of 4")
        if isinstance(self.skip, str) or not all(isinstance(p, str) for p in self.skip):
            raise TypeError(f"skip={self.skip!r}: must be a tuple of fnmatch pattern strings")
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.recover is not None:
            if not isinstance(self.recover, DistillConfig):
                raise TypeError(f"recover={self.recover!r}: must be a DistillConfig or None")
            if self.recover.num_layers is not None or self.recover.keep is not None:
                raise ValueError("recover: the pruned model keeps every block (num_layers/keep must be None)")
        check_tune(self.tune_steps, self.tune_lr)
        if self.tune_steps and not self.needs_calibration:
            raise ValueError(f"tune_steps={self.tune_steps} with method={self.method!r}: tuning runs inside the "
                             "calibrated block-by-block pass; use 'sparsegpt' or 'wanda'")
        if self.tune_steps and not self.sequential:
            raise ValueError(f"tune_steps={self.tune_steps} with sequential=False: tuning runs inside the "
                             "block-by-block pass (sequential=True)")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"

    @property
    def name(self) -> str:
        return ("2:4" + ("" if self.method == "sparsegpt" else f"-{self.method}")
                + tune_suffix(self.tune_steps, DEFAULT_SPARSE_TUNE_STEPS) + ("-kd" if self.recover else ""))


@dataclass(frozen=True)
class CompressConfig:
    """What `qruntime.compress` does to a model.

    Attributes:
        quant: the weight quantization recipe.
        include: fnmatch patterns on module names (``model.layers.0.mlp.up_proj``); a layer is a target
            only if it matches one of them.
        exclude: patterns of layers to leave alone; checked after ``include``. Defaults to the output
            head, embeddings and classifier heads (:data:`qruntime.nn.targets.DEFAULT_EXCLUDE`); the pattern
            :data:`~qruntime.nn.targets.OUTPUT_HEAD` matches ``model.get_output_embeddings()`` under any name.
        embeddings: when set, the input embedding (``model.get_input_embeddings()``) is stored in this
            format (round to nearest, rows = tokens), and an output head tied to it becomes a
            QuantLinear sharing the same packed tensors; None keeps them in float.
        smoothquant: W8A8 only: SmoothQuant migration strength alpha in (0, 1), or ``"auto"`` to search
            it per group of layers (:mod:`qruntime.quant.smoothquant`; needs calibration data), or None.
        distill: a depth stage before quantization: the model is replaced by a student with fewer
            blocks, distilled from it (:class:`DistillConfig`; needs training data), or None.
        sparsity: 2:4 structured sparsity of the targets (:class:`SparsityConfig`), or None. With
            sparsity, ``quant`` may be None: the kept values stay in the layer's float dtype.
        awq: weight-only recipes: activation-aware scaling of the input channels (:mod:`qruntime.quant.awq`),
            searched per group of layers on the calibration Hessians and folded into the preceding norm
            or Linear like SmoothQuant (needs calibration data).
        max_ppl_increase: an accuracy budget (:mod:`qruntime.quant.budget`): the most sensitive layers are given
            the ``fallback`` format until the measured perplexity is at most ``(1 + max_ppl_increase)``
            times the original's (causal LMs; measured on ``eval_data`` if given, else the calibration
            data), or None.
        fallback: the budget's higher-precision format: ``"w8a16"`` (INT8 per channel, round to nearest)
            or ``"float"`` (the layer is left unconverted, listed as skipped with the reason).
    """

    quant: QuantConfig | None = field(default_factory=QuantConfig)
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    embeddings: QuantConfig | None = None
    smoothquant: float | str | None = None
    distill: DistillConfig | None = None
    sparsity: SparsityConfig | None = None
    awq: bool = False
    max_ppl_increase: float | None = None
    fallback: str = "w8a16"

    def __post_init__(self) -> None:
        if self.sparsity is not None:
            if not isinstance(self.sparsity, SparsityConfig):
                raise TypeError(f"sparsity={self.sparsity!r}: must be a SparsityConfig or None")
            if self.quant is not None and self.quant.act_bits != 16:
                raise ValueError(f"sparsity with {self.quant.name}: 2:4 kernels take float activations (w8a16 / w4a16)")
            if self.quant is not None and self.quant.clip != "none":
                raise ValueError(f"sparsity with {self.quant.name}: the clipping search is not implemented for 2:4 "
                                 "kept values (use clip='none')")
            if self.quant is not None and self.quant.tune_steps:
                raise ValueError(f"sparsity with {self.quant.name}: scale tuning is not implemented for 2:4 kept "
                                 "values; tune the kept weights before quantization instead (SparsityConfig."
                                 "tune_steps, preset '2:4-tune+...')")
        elif self.quant is None:
            raise ValueError("quant=None: nothing to do; give a QuantConfig, or a SparsityConfig for 2:4 alone")
        if self.distill is not None:
            if not isinstance(self.distill, DistillConfig):
                raise TypeError(f"distill={self.distill!r}: must be a DistillConfig or None")
            if self.distill.num_layers is None and self.distill.keep is None:
                raise ValueError("distill: set num_layers or keep (the student's depth)")
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise TypeError(f"quant={self.quant!r}: must be a QuantConfig")
        if self.embeddings is not None:
            if not isinstance(self.embeddings, QuantConfig):
                raise TypeError(f"embeddings={self.embeddings!r}: must be a QuantConfig or None")
            if self.embeddings.act_bits != 16 or self.embeddings.method != "rtn" or self.embeddings.clip == "act":
                raise ValueError(
                    f"embeddings={self.embeddings.name}: embeddings are quantized round-to-nearest with "
                    "float activations and no calibration data (act_bits=16, method='rtn', clip 'none' or 'mse')"
                )
        for attr in ("include", "exclude"):
            value = getattr(self, attr)
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise TypeError(f"{attr}={value!r}: must be a tuple of fnmatch pattern strings")
            object.__setattr__(self, attr, tuple(value))
        if not self.include:
            raise ValueError("include=(): no layer could ever be selected; use ('*',) for all")
        if self.max_ppl_increase is not None:
            if isinstance(self.max_ppl_increase, bool) or not isinstance(self.max_ppl_increase, (int, float)) \
                    or not 0 < self.max_ppl_increase < 10:
                raise ValueError(f"max_ppl_increase={self.max_ppl_increase!r}: must be a number in (0, 10), e.g. "
                                 "0.02 for perplexity within 2% of the original's")
            if self.sparsity is not None or self.quant is None:
                raise ValueError(f"max_ppl_increase with {self.format_name}: the accuracy budget chooses between "
                                 "quantization formats; it does not apply to 2:4 recipes")
        if self.fallback not in ("w8a16", "float"):
            raise ValueError(f"fallback={self.fallback!r}: must be 'w8a16' or 'float'")
        if self.awq:
            if self.quant is None or self.quant.act_bits != 16 or self.sparsity is not None:
                raise ValueError(
                    f"awq=True with {self.format_name}: AWQ scaling is for weight-only recipes without 2:4 "
                    "(w8a16 / w4a16); W8A8 has SmoothQuant ('-sq')"
                )
        if self.smoothquant is not None:
            if self.quant is None or self.quant.act_bits != 8:
                raise ValueError(
                    f"smoothquant={self.smoothquant} with {self.quant_name}: SmoothQuant is for INT8 activations (w8a8)"
                )
            if self.smoothquant != "auto" and (
                not isinstance(self.smoothquant, (int, float)) or not 0 < self.smoothquant < 1
            ):
                raise ValueError(
                    f"smoothquant={self.smoothquant!r}: the migration strength must be in (0, 1), or 'auto'"
                )

    @property
    def needs_calibration(self) -> bool:
        return (
            (self.quant is not None and self.quant.needs_calibration)
            or self.smoothquant is not None
            or self.awq
            or self.max_ppl_increase is not None
            or (self.sparsity is not None and self.sparsity.needs_calibration)
        )

    @property
    def quant_name(self) -> str:
        """The weight format of the targets: the quant recipe's name, or "float" (2:4 alone)."""
        return "float" if self.quant is None else self.quant.name

    @property
    def format_name(self) -> str:
        """Per-layer format: e.g. ``w8a16``, ``2:4``, ``2:4+w4a16-g128-asym``."""
        if self.sparsity is None:
            return self.quant_name
        return "2:4" if self.quant is None else f"2:4+{self.quant.name}"

    @property
    def name(self) -> str:
        s = self.quant_name if self.quant is not None else ""
        if self.sparsity is not None:
            s = self.sparsity.name + (f"+{s}" if s else "")
        if self.awq:
            s += "-awq"
        if self.smoothquant is not None:
            s += "-sq" if self.smoothquant == 0.5 else (
                "-sqauto" if self.smoothquant == "auto" else f"-sq{self.smoothquant:g}")
        elif self.quant is not None and self.quant.act_bits == 8:
            s += "-nosq"  # plain "w8a8" is SmoothQuant
        if self.embeddings is not None:
            s += f"-emb{self.embeddings.bits}"
        if self.max_ppl_increase is not None:
            s += f"-budget{self.max_ppl_increase:g}" + ("-float" if self.fallback == "float" else "")
        if self.distill is not None:
            depth = self.distill.num_layers if self.distill.num_layers is not None else len(self.distill.keep)
            s = f"d{depth}+{s}"
        return s



def data_free_variant(cfg: CompressConfig) -> CompressConfig | None:
    """The nearest recipe that needs no calibration data (round to nearest, no SmoothQuant / AWQ / tuning /
    budget, activation-aware clipping dropped, magnitude masks), for error messages; None when ``cfg``
    needs no data or has a stage that needs training data anyway."""
    if not cfg.needs_calibration or cfg.distill is not None or (cfg.sparsity is not None and cfg.sparsity.recover):
        return None
    quant = cfg.quant
    if quant is not None:
        quant = replace(quant, method="rtn", clip="none" if quant.clip == "act" else quant.clip, tune_steps=0,
                        tune_rounding=False)
    sparsity = None if cfg.sparsity is None else replace(cfg.sparsity, method="magnitude", tune_steps=0)
    return replace(cfg, quant=quant, sparsity=sparsity, smoothquant=None, awq=False, max_ppl_increase=None,
                   fallback="w8a16")

