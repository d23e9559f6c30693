"""Compression recipes: small validated dataclasses and the preset names users type.

A preset string is parsed into a :class:`CompressConfig`; grammar::

    w8a16                 INT8 weights, per output channel, symmetric, round to nearest (no data)
    w8a8                  INT8 weights per channel + INT8 activations quantized per token at run time,
                          with SmoothQuant (alpha 0.5) folded into the norms (calibrated)
    w8a8-sq0.75           ... another migration strength; "-sqauto": alpha searched per group of layers;
                          "-nosq": no SmoothQuant (plain per-token W8A8, no data)
    w4a16                 INT4 weights, per output channel, asymmetric (zero points), GPTQ rounding
                          with act-order (calibrated)
    w4a16-g128            INT4 weights in groups of 128 along K, asymmetric, GPTQ (calibrated)
    w4a16-g64-sym         ... symmetric (no zero points)
    w4a16-g128-rtn        any INT4 recipe rounded to nearest instead of GPTQ (no data)
    w8a16-gptq            INT8 recipes with GPTQ rounding (calibrated); "-gptq" on INT4 recipes is the
                          default, accepted and written out in full names (w4a16-g128-asym-gptq)
    w4a16-g128-mse        any of the above with each group's range searched to minimize the rounding error
                          (with -rtn: no data); "-clip": weighted by the calibration activations
    w4a16-g128-gptq-budget0.02  any of the above under an accuracy budget: the most sensitive layers are
                          given INT8 ("-budget0.02-float": left in float) until the perplexity measured
                          on the budget data is within 2% of the original's (calibrated; causal LMs)
    auto                  w4a16-g128-gptq-clip-budget0.02
    w4a16-g128-awq        weight-only recipes: AWQ activation-aware channel scaling folded into the norms
                          (calibrated); combines with -gptq and -mse/-clip (w4a16-g128-gptq-clip-awq)
    w4a16-g128-gptq-tune  weight-only recipes: after each block is quantized, its scales are tuned to bring
                          its output closer to the float block's (64 steps; "-tune32": 32; calibrated);
                          before -awq in the name (w4a16-g128-gptq-clip-tune-awq); "-tune-round": the
                          codes are tuned too, each free to move to the other grid point next to the
                          value it was rounded from (AutoRound-style learned rounding)
    w4a16-g128-emb8       any of the above, plus the input embedding (and an output head tied to it)
                          in INT8 per row; "-emb4": INT4, in the recipe's groups (default 128), asymmetric
    d20+w4a16-g128-gptq   any of the above after a depth stage: a 20-block student distilled from the
                          model (DistillConfig defaults; needs training data), then quantized
    2:4                   2:4 structured sparsity (SparseGPT, needs calibration data), kept values in
                          the layer's float dtype; "2:4-magnitude" / "2:4-wanda" choose the mask otherwise
    2:4+w8a16             ... with the kept values in INT8 (any weight-only recipe above: 2:4+w4a16-g128,
                          GPTQ-rounded on the pruned weights; 2:4-magnitude+w4a16-g128-rtn needs no data)
    2:4-kd+w8a16          ... with a recovery stage: the pruned model is distilled from the original with
                          the masks fixed (DistillConfig defaults; needs training data) before packing
    2:4-tune              ... each block's kept weights tuned to its float output after the block is
                          pruned, masks fixed (128 steps; "-tune64": 64; calibration data only), before -kd
                          and any +<weight recipe> (2:4-tune+w8a16, 2:4-wanda-tune-kd)

Group sizes are powers of two >= 16. With "a16" the activations stay in the model's float dtype;
"a8" (INT8 weights only) quantizes each token's activations to INT8 with its own scale at run time.

The defaults follow the calibration issue's preset list: ``w8a8`` is SmoothQuant and the INT4 recipes
are GPTQ, so both need calibration data; ``w8a16`` (the default of :func:`qruntime.compress`) needs none.
The data-free variants are spelled out: ``w8a8-nosq``, ``w4a16-g128-rtn``. Full names
(:attr:`CompressConfig.name`, the report's ``config``) always state the INT4 rounding (``-rtn`` /
``-gptq``) and the W8A8 smoothing (``-sq`` / ``-nosq``), and parse back to the same config.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

__all__ = ["CompressConfig", "QuantConfig", "DistillConfig", "SparsityConfig", "PRESETS", "SELECTION_METHODS", "resolve_config",
           "data_free_variant", "DEFAULT_EXCLUDE", "OUTPUT_HEAD"]

# Heads and embeddings are kept in full precision by default: they are few layers, they dominate the
# accuracy loss when quantized, and lm_head is usually tied to the embedding matrix.
# OUTPUT_HEAD in ``exclude`` matches the model's output head, whatever its name
# (``model.get_output_embeddings()``: RoBERTa's ``lm_head.decoder``, DistilBERT's ``vocab_projector``).
OUTPUT_HEAD = "<output head>"
DEFAULT_EXCLUDE: tuple[str, ...] = (
    OUTPUT_HEAD,
    "lm_head",
    "*.lm_head",
    "*embed*",
    "*wte",
    "*wpe",
    "classifier",
    "*.classifier",
    "classifier.*",
    "score",
    "qa_outputs",
    "cls.*",
)


def _check_group_size(group_size: int | None) -> None:
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size={group_size!r}: must be an int or None (per-channel)")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size={group_size}: must be a power of two >= 16, or None for per-channel")


# steps of "-tune" without a number: QuantConfig.tune_steps (scales), SparsityConfig.tune_steps (2:4 kept
# weights: more free values, more steps before the held-out error stops falling)
DEFAULT_TUNE_STEPS = 64
DEFAULT_SPARSE_TUNE_STEPS = 128


def _check_tune(steps, lr) -> None:
    """The ``tune_steps`` / ``tune_lr`` fields of QuantConfig and SparsityConfig."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"tune_steps={steps!r}: must be an int >= 0 (0: no tuning)")
    if not (isinstance(lr, (int, float)) and 0 < lr <= 0.1):
        raise ValueError(f"tune_lr={lr!r}: must be in (0, 0.1]")


def _tune_suffix(steps: int, default: int) -> str:
    """The preset suffix of ``steps`` tuning steps: "" (off), "-tune" (the default) or "-tune<steps>"."""
    return "" if not steps else ("-tune" if steps == default else f"-tune{steps}")


def _parse_tune(name: str, flag: str | None, digits: str | None, default: int) -> int:
    """Steps of a preset's "-tune[<steps>]" (``flag`` None: no suffix, 0 steps)."""
    if flag is None:
        return 0
    steps = int(digits) if digits else default
    if steps < 1:
        raise ValueError(f"preset {name!r}: '-tune<steps>' needs steps >= 1")
    return steps

# clip method -> its preset suffix
CLIP_METHODS: dict[str, str] = {"none": "", "mse": "-mse", "act": "-clip"}


@dataclass(frozen=True)
class QuantConfig:
    """How the weights of one Linear are quantized.

    Attributes:
        bits: 8 or 4.
        group_size: number of consecutive input columns (along K) that share a scale; ``None`` means
            one scale per output channel. INT8 is per-channel only.
        symmetric: symmetric (no zero point) or asymmetric (a 4-bit zero point per group).
            INT8 is symmetric only.
        method: ``"rtn"`` (round to nearest, no data) or ``"gptq"`` (rounds column by column and
            compensates the error on the remaining columns with the inverse Hessian of the layer's
            calibration inputs; scales and zero points are those of RTN, so the format is unchanged).
        gptq_damp: dampening added to the Hessian diagonal, as a fraction of its mean.
        gptq_block_size: columns updated together (lazy batch updates).
        gptq_act_order: GPTQ visits columns by decreasing activation energy (static groups: the
            format is unchanged).
        act_bits: 16 (activations stay floating point) or 8 (dynamic per-token INT8 activations and
            int32 accumulation; INT8 weights only).
        clip: how each group's (INT4) or row's (INT8) range is set (:mod:`qruntime.clip`): ``"none"``
            (its min and max, round to nearest's grid), ``"mse"`` (shrunk to minimize the weight's
            squared rounding error; no data) or ``"act"`` (shrunk to minimize the error weighted by each
            input column's mean squared activation; needs calibration data). Same packed format; with
            GPTQ the codes are chosen on the searched grid.
        sequential: calibrated methods (GPTQ, clip "act") run block by block: each block's layers are
            calibrated on the outputs of the blocks before them *as quantized* (:mod:`qruntime.sequential`;
            about three forward passes of the calibration data instead of one). False: one pass of the
            float model.
        tune_steps: after each block is quantized, its layers' scales are tuned for this many Adam steps
            (one calibration window each) to bring the block's output closer to the float model's
            output of that block (:mod:`qruntime.tune`; codes, zero points and format unchanged; kept
            only if the block's error on held-out calibration windows went down). 0: off. Needs
            calibration data and ``sequential``.
        tune_lr: the Adam learning rate of that tuning, on the relative change of each scale.
        tune_rounding: the tuning trains the codes too: each may move to the other grid point next to the
            value it was rounded from (GPTQ's error-compensated weight, or the weight), through a
            rounding offset in [-1/2, 1/2] (:class:`qruntime.tune._RoundedWeight`; Adam learning rate
            :data:`qruntime.tune.ROUND_LR`). Same format. Needs ``tune_steps``.
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block_size: int = 128
    gptq_act_order: bool = True
    act_bits: int = 16
    clip: str = "none"
    sequential: bool = True
    tune_steps: int = 0
    tune_lr: float = 2e-3
    tune_rounding: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r}: must be 8 or 4")
        _check_group_size(self.group_size)
        if self.bits == 8 and self.group_size is not None:
            raise ValueError(f"bits=8 with group_size={self.group_size}: INT8 is per-channel only (group_size=None)")
        if self.bits == 8 and not self.symmetric:
            raise ValueError("bits=8 with symmetric=False: INT8 weights are symmetric only")
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits={self.act_bits!r}: must be 16 or 8")
        if self.act_bits == 8 and self.bits != 8:
            raise ValueError(f"bits={self.bits} with act_bits=8: INT8 activations need INT8 weights (w8a8)")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method={self.method!r}: must be 'rtn' or 'gptq'")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"gptq_damp={self.gptq_damp}: must be in [0, 1)")
        if self.gptq_block_size < 1:
            raise ValueError(f"gptq_block_size={self.gptq_block_size}: must be >= 1")
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip={self.clip!r}: must be one of {list(CLIP_METHODS)}")
        _check_tune(self.tune_steps, self.tune_lr)
        if self.tune_steps and self.act_bits == 8:
            raise ValueError(f"tune_steps={self.tune_steps} with act_bits=8: the tuning runs the block with float "
                             "activations and would not see their INT8 rounding (weight-only recipes only)")
        if self.tune_steps and not self.sequential:
            raise ValueError(f"tune_steps={self.tune_steps} with sequential=False: scale tuning runs inside the "
                             "block-by-block pass (sequential=True)")
        if not isinstance(self.tune_rounding, bool):
            raise TypeError(f"tune_rounding={self.tune_rounding!r}: must be a bool")
        if self.tune_rounding and not self.tune_steps:
            raise ValueError("tune_rounding=True with tune_steps=0: the codes are trained by the block tuning "
                             "(set tune_steps, e.g. 64)")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.clip == "act" or self.tune_steps > 0

    @property
    def name(self) -> str:
        s = f"w{self.bits}a{self.act_bits}"
        if self.group_size is not None:
            s += f"-g{self.group_size}"
        if self.bits == 4:
            s += "-sym" if self.symmetric else "-asym"
        if self.method != "rtn" or self.bits == 4:  # INT4 states its rounding (plain presets are GPTQ)
            s += f"-{self.method}"
        s += CLIP_METHODS[self.clip]
        return s + _tune_suffix(self.tune_steps, DEFAULT_TUNE_STEPS) + ("-round" if self.tune_rounding else "")


@dataclass(frozen=True)
class SparsityConfig:
    """2:4 structured sparsity of the Linear weights (:mod:`qruntime.prune`).

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
            block's (:mod:`qruntime.tune`; kept only if the block's error on held-out calibration windows
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
        _check_tune(self.tune_steps, self.tune_lr)
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
                + _tune_suffix(self.tune_steps, DEFAULT_SPARSE_TUNE_STEPS) + ("-kd" if self.recover else ""))


@dataclass(frozen=True)
class CompressConfig:
    """What `qruntime.compress` does to a model.

    Attributes:
        quant: the weight quantization recipe.
        include: fnmatch patterns on module names (``model.layers.0.mlp.up_proj``); a layer is a target
            only if it matches one of them.
        exclude: patterns of layers to leave alone; checked after ``include``. Defaults to the output
            head, embeddings and classifier heads (:data:`DEFAULT_EXCLUDE`); the pattern
            :data:`OUTPUT_HEAD` matches ``model.get_output_embeddings()`` under any name.
        embeddings: when set, the input embedding (``model.get_input_embeddings()``) is stored in this
            format (round to nearest, rows = tokens), and an output head tied to it becomes a
            QuantLinear sharing the same packed tensors; None keeps them in float.
        smoothquant: W8A8 only: SmoothQuant migration strength alpha in (0, 1), or ``"auto"`` to search
            it per group of layers (:mod:`qruntime.smooth`; needs calibration data), or None.
        distill: a depth stage before quantization: the model is replaced by a student with fewer
            blocks, distilled from it (:class:`DistillConfig`; needs training data), or None.
        sparsity: 2:4 structured sparsity of the targets (:class:`SparsityConfig`), or None. With
            sparsity, ``quant`` may be None: the kept values stay in the layer's float dtype.
        awq: weight-only recipes: activation-aware scaling of the input channels (:mod:`qruntime.awq`),
            searched per group of layers on the calibration Hessians and folded into the preceding norm
            or Linear like SmoothQuant (needs calibration data).
        max_ppl_increase: an accuracy budget (:mod:`qruntime.mixed`): the most sensitive layers are given
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


_PRESET_RE = re.compile(
    r"^w(?P<bits>8|4)a(?P<abits>16|8)(?:-g(?P<group>\d+))?(?:-(?P<sym>sym|asym))?(?:-(?P<method>rtn|gptq))?(?:-(?P<clip>mse|clip))?(?:-tune(?P<tune>\d+)?(?P<tuneflag>)(?P<round>-round)?)?(?P<awq>-awq)?(?:(?P<sqflag>-sq(?P<sq>0?\.\d+|auto)?)|(?P<nosq>-nosq))?(?:-emb(?P<emb>8|4))?(?:-budget(?P<budget>\d*\.?\d+)(?P<float>-float)?)?$"
)

AUTO_PRESET = "w4a16-g128-gptq-clip-budget0.02"

PRESETS: dict[str, str] = {
    "w8a16": "INT8 weights, per-channel symmetric scales, round to nearest (no data)",
    "w8a16-gptq": "INT8 weights, per-channel, GPTQ rounding (calibrated)",
    "w8a16-gptq-clip": "INT8 weights, per-channel, range searched on the calibration activations, then GPTQ",
    "w8a8": "INT8 weights per channel, INT8 activations per token (dynamic), int32 accumulation, with "
            "SmoothQuant (alpha 0.5; -sq0.75 for another) folded into the norms (calibrated)",
    "w8a8-gptq": "w8a8 (SmoothQuant) with GPTQ rounding of the weights (calibrated)",
    "w8a8-sqauto": "w8a8 with SmoothQuant, alpha searched per group of layers on the calibration data",
    "w8a8-nosq": "plain per-token W8A8, no SmoothQuant, round to nearest (no data)",
    "w4a16": "INT4 weights, per-channel asymmetric, GPTQ with act-order (calibrated)",
    "w4a16-g128": "INT4 weights, groups of 128 along K, asymmetric, GPTQ with act-order (calibrated)",
    "w4a16-g64": "INT4 weights, groups of 64 along K, asymmetric, GPTQ with act-order (calibrated)",
    "w4a16-g32": "INT4 weights, groups of 32 along K, asymmetric, GPTQ with act-order (calibrated)",
    "w4a16-g128-rtn": "INT4 g128 asymmetric, round to nearest (no data; '-rtn' on any INT4 recipe)",
    "w4a16-g128-rtn-mse": "INT4 g128, each group's range shrunk to minimize its squared rounding error (no data)",
    "w4a16-g128-gptq-clip": "INT4 g128, range searched with activation-weighted error (calibrated), then GPTQ",
    "auto": f"{AUTO_PRESET}: INT4 where the accuracy budget allows, INT8 for the most sensitive layers",
    "w4a16-g128-awq": "INT4 g128 GPTQ after AWQ scaling (alpha searched per group on calibration Hessians, folded)",
    "w4a16-g128-gptq-clip-tune-awq": "INT4 g128: AWQ, clipping search, GPTQ, then each block's scales tuned "
                                     "to its float output (64 steps; '-tune<steps>' for another number)",
    "w4a16-g128-gptq-clip-tune-round-awq": "as -tune-awq, with the codes tuned too (learned rounding: each code "
                                           "may move to the other grid point next to its GPTQ value)",
    "w4a16-g128-gptq-emb4": "w4a16-g128 (GPTQ), plus the token embedding (and a tied lm_head) in INT4 g128",
    "w8a16-emb8": "w8a16, plus the token embedding (and a tied lm_head) in INT8 per row",
    "2:4": "2:4 structured sparsity by SparseGPT (calibrated), kept values in the layer's float dtype",
    "2:4-magnitude": "2:4 by weight magnitude (no data); '2:4-wanda': by |W| x input norm (calibrated)",
    "2:4+w8a16": "2:4 (SparseGPT) with the kept values in INT8 per channel",
    "2:4+w4a16-g128": "2:4 (SparseGPT) with the kept values in INT4, groups of 128, asymmetric, GPTQ-rounded",
    "2:4-kd+w8a16": "2:4, then a KD recovery fine-tune with the masks fixed (needs training data), then INT8",
    "2:4-tune": "2:4 (SparseGPT), each block's kept weights then tuned to its float output on the calibration "
                "data (128 steps; '-tune<steps>' for another number)",
    "d20+w4a16-g128-gptq": "d<N>+<recipe>: distill an N-block student from the model (measured block choice + KD; needs training data), then <recipe>",
}


def parse_preset(name: str) -> CompressConfig:
    """Turns a preset name (see the module docstring) into a :class:`CompressConfig`."""
    if name.strip().lower() == "auto":
        return parse_preset(AUTO_PRESET)
    depth = re.match(r"^d(\d+)\+(.+)$", name.strip().lower())
    if depth is not None:
        return replace(parse_preset(depth[2]), distill=DistillConfig(num_layers=int(depth[1])))
    sparse = re.match(r"^2:4(?:-(magnitude|wanda|sparsegpt))?(?:-tune(\d+)?(?P<tuneflag>))?(-kd)?(?:\+(.+))?$",
                      name.strip().lower())
    if sparse is not None:
        tune = _parse_tune(name, sparse["tuneflag"], sparse[2], DEFAULT_SPARSE_TUNE_STEPS)
        if tune and sparse[1] == "magnitude":
            raise ValueError(f"preset {name!r}: '-tune' needs calibration data and a calibrated mask "
                             "('2:4-tune' (SparseGPT) or '2:4-wanda-tune')")
        sparsity = SparsityConfig(method=sparse[1] or "sparsegpt", recover=DistillConfig() if sparse[4] else None,
                                  tune_steps=tune)
        if sparse[5] is None:
            return CompressConfig(quant=None, sparsity=sparsity)
        base = parse_preset(sparse[5])
        if base.quant is not None and base.quant.act_bits != 16:
            raise ValueError(f"preset {name!r}: 2:4 kernels take float activations; use w8a16 or w4a16")
        if base.sparsity is not None or base.distill is not None or base.smoothquant is not None or base.embeddings is not None:
            raise ValueError(f"preset {name!r}: after '2:4+' give a weight recipe such as 'w8a16' or 'w4a16-g128'")
        return replace(base, sparsity=sparsity)
    if name.strip().lower().startswith(("2:", "4:")):
        raise ValueError(
            f"unknown preset {name!r}: sparse recipes are '2:4[-magnitude|-wanda|-sparsegpt][-tune[<steps>]][-kd][+<weight recipe>]'; "
            "other N:M patterns (e.g. 4:8) have no kernels: use qruntime.prune.prune_model for them"
        )
    m = _PRESET_RE.match(name.strip().lower())
    if m is None:
        raise ValueError(
            f"unknown preset {name!r}: expected one of {sorted(PRESETS)} or the form "
            "'w8a16' / 'w8a8' / 'w4a16[-g<group>][-sym|-asym]' with an optional '-rtn' or '-gptq', '-mse' or '-clip', '-tune[<steps>][-round]', '-awq', '-sq[<alpha>|auto]' or '-nosq' (w8a8), '-emb8|4', "
            "'-budget<x>[-float]'"
        )
    bits = int(m["bits"])
    act_bits = int(m["abits"])
    if act_bits == 8 and bits != 8:
        raise ValueError(f"preset {name!r}: INT8 activations need INT8 weights (w8a8)")
    group = int(m["group"]) if m["group"] else None
    sym = m["sym"]
    method = m["method"] or ("gptq" if bits == 4 else "rtn")  # the calibration issue's presets: INT4 is GPTQ
    clip = {"mse": "mse", "clip": "act", None: "none"}[m["clip"]]
    tune = _parse_tune(name, m["tuneflag"], m["tune"], DEFAULT_TUNE_STEPS)
    if bits == 8:
        if sym == "asym":
            raise ValueError(f"preset {name!r}: INT8 weights are symmetric only")
        quant = QuantConfig(bits=8, group_size=group, symmetric=True, method=method, act_bits=act_bits, clip=clip,
                            tune_steps=tune, tune_rounding=bool(m["round"]))
    else:
        quant = QuantConfig(bits=4, group_size=group, symmetric=(sym == "sym"), method=method, clip=clip,
                            tune_steps=tune, tune_rounding=bool(m["round"]))
    smoothquant = None
    if (m["sqflag"] is not None or m["nosq"]) and act_bits != 8:
        raise ValueError(f"preset {name!r}: SmoothQuant ('-sq' / '-nosq') is for INT8 activations (w8a8)")
    if act_bits == 8 and not m["nosq"]:  # plain "w8a8" is SmoothQuant at alpha 0.5
        smoothquant = "auto" if m["sq"] == "auto" else (float(m["sq"]) if m["sq"] else 0.5)
    if m["awq"] and act_bits != 16:
        raise ValueError(f"preset {name!r}: AWQ ('-awq') is for weight-only recipes (w8a16 / w4a16); W8A8 has '-sq'")
    return CompressConfig(quant=quant, embeddings=embedding_config(int(m["emb"]), quant) if m["emb"] else None,
                          smoothquant=smoothquant, awq=bool(m["awq"]),
                          max_ppl_increase=float(m["budget"]) if m["budget"] else None,
                          fallback="float" if m["float"] else "w8a16")


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


def embedding_config(bits: int, quant: QuantConfig) -> QuantConfig:
    """The embedding format of "-emb8" / "-emb4": INT8 per row, or INT4 asymmetric in the recipe's
    groups (128 when the recipe has none)."""
    if bits == 8:
        return QuantConfig(bits=8)
    group = quant.group_size if quant.bits == 4 and quant.group_size is not None else 128
    return QuantConfig(bits=4, group_size=group, symmetric=False)


def resolve_config(config: CompressConfig | QuantConfig | str | None, **overrides) -> CompressConfig:
    """Accepts a preset name, a QuantConfig, a CompressConfig or None (= ``"w8a16"``)."""
    if config is None:
        config = "w8a16"
    if isinstance(config, str):
        config = parse_preset(config)
    elif isinstance(config, QuantConfig):
        config = CompressConfig(quant=config)
    elif not isinstance(config, CompressConfig):
        raise TypeError(f"config={config!r}: expected a preset name, QuantConfig or CompressConfig")
    return replace(config, **overrides) if overrides else config


# 2:4 pruning methods (qruntime.prune) -> what each keeps
PRUNE_METHODS: dict[str, str] = {
    "magnitude": "keep the largest |W| of each group (no data)",
    "wanda": "keep the largest |W| x ||X||_2 of each group (activation norms from calibration data)",
    "sparsegpt": "Hessian-aware mask with an update of the kept weights (calibration data)",
}


SELECTION_METHODS: dict[str, str] = {
    "greedy": "drop, one at a time, the block whose removal changes the teacher's outputs least on the "
    "selection data (measured, re-measured after each drop)",
    "single": "drop the blocks whose removal alone changes the outputs least (measured once per block)",
    "influence": "drop the blocks that change their input least (1 - cosine of input and output "
    "hidden states, one pass)",
    "angular": "drop the contiguous run of blocks whose input and output hidden states are closest "
    "in angle (one pass)",
    "uniform": "keep evenly spaced blocks (every other one at half depth); not measured",
    "first": "keep the first blocks; not measured",
    "middle": "drop the middle blocks; not measured",
}


@dataclass(frozen=True)
class DistillConfig:
    """How a smaller-depth student is built and trained from a teacher (:func:`qruntime.distill`).

    Student:
        num_layers: blocks the student keeps; or ``keep``: the teacher's block indices to keep
            (strictly increasing). At most one of them; neither when :func:`qruntime.distill` is given
            the student (or its depth) directly.
        selection: how the kept blocks are chosen when only ``num_layers`` is given (see
            :data:`SELECTION_METHODS`); the measured ones run ``selection_batches`` batches of the
            training data (spread evenly over it) through the teacher.

    Loss (each term's weight; 0 turns it off):
        alpha_kd: ``T^2 * KL(teacher || student)`` of the output logits at temperature ``temperature``
            (models with logits: causal LMs, classifiers). For a model without logits (an encoder) the
            default loss (``alpha_kd=1`` alone) becomes ``alpha_hidden=1`` + ``alpha_cosine=1``; the
            report lists the weights used.
        alpha_hidden: MSE between each student block's output and the output of the teacher block it
            was copied from, divided by the teacher's mean square (scale-free).
        alpha_cosine: ``1 - cosine`` of the last hidden states, per token (encoders: the embeddings).
        alpha_attention: KL between the teacher's and the student's attention probabilities on mapped
            blocks (needs a model that returns them, i.e. eager attention).
        alpha_ce: cross-entropy on the next token of the text (causal LMs only).
        top_k: if set, the KD term uses only the teacher's top-k logits (renormalized), which is what
            ``cache_teacher`` stores per token instead of the full vocabulary.
        cache_teacher: run the teacher once over the training data before training and keep its top-k
            logits (needs ``top_k``; no hidden/attention terms), so the teacher is not run per step.

    Training:
        steps: optimizer steps; each sees ``grad_accum`` batches of the training data (cycled when
            shorter). lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to
            ``min_lr_ratio * lr``. max_grad_norm: clipping (0: none).
        trainable: ``"no-embeddings"`` (default: everything but the input embedding and an output head
            tied to it, so the vocabulary matrix is neither updated nor given optimizer state) or
            ``"all"``.
        autocast: ``"auto"`` (bf16 where the device runs it natively: CUDA with bf16, or a CPU with
            AVX-512 BF16/AMX), ``"bf16"`` or ``"off"``. Weights and optimizer state stay float32.
        dropout: train the student with its dropout layers active (its ``train()`` mode). Off by
            default: the student trains in ``eval()`` mode, the same function the teacher computes, which
            fits it faster in a short budget (MiniLM 6 -> 3 blocks, equal steps: sentence cosine 0.887
            against 0.875 with BERT's 0.1 dropout; docs/distillation.md). Models without dropout (Llama,
            SmolLM2) train the same either way. Gradient checkpointing (``gradient_checkpointing_enable()``)
            stays on in eval mode: the checkpointed layers alone keep their training flag.
        eval_every: evaluate on the held-out batches every this many steps (0: only before and after).
        max_seconds: stop after this much training time (the report says so); the learning rate then
            decays by time or steps, whichever is further along, so the run is not bit-reproducible.
        seed: the only random numbers are the order of the data when ``shuffle``, and dropout's with
            ``dropout=True``.
    """

    num_layers: int | None = None
    keep: tuple[int, ...] | None = None
    selection: str = "single"
    selection_batches: int = 4
    alpha_kd: float = 1.0
    alpha_hidden: float = 0.0
    alpha_cosine: float = 0.0
    alpha_attention: float = 0.0
    alpha_ce: float = 0.0
    temperature: float = 1.0
    top_k: int | None = None
    cache_teacher: bool = False
    steps: int = 100
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    trainable: str = "no-embeddings"
    autocast: str = "auto"
    dropout: bool = False
    eval_every: int = 0
    max_seconds: float | None = None
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_layers is not None and self.keep is not None:
            raise ValueError(f"num_layers={self.num_layers!r}, keep={self.keep!r}: give one of them, not both")
        if self.num_layers is not None and (isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int)):
            raise TypeError(f"num_layers={self.num_layers!r}: must be an int")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers}: must be >= 1")
        if self.keep is not None:
            object.__setattr__(self, "keep", check_keep(self.keep))
        if self.selection not in SELECTION_METHODS:
            raise ValueError(f"selection={self.selection!r}: must be one of {sorted(SELECTION_METHODS)}")
        if self.selection_batches < 1:
            raise ValueError(f"selection_batches={self.selection_batches}: must be >= 1")
        alphas = {k: getattr(self, k) for k in ("alpha_kd", "alpha_hidden", "alpha_cosine", "alpha_attention", "alpha_ce")}
        if any(a < 0 for a in alphas.values()) or not any(a > 0 for a in alphas.values()):
            raise ValueError(f"loss weights {alphas}: must be >= 0 with at least one > 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1 or None")
        if self.cache_teacher and self.top_k is None:
            raise ValueError("cache_teacher=True needs top_k (the cache keeps the teacher's top-k logits per token)")
        if self.cache_teacher and (self.alpha_hidden or self.alpha_attention or self.alpha_cosine):
            raise ValueError(
                "cache_teacher=True keeps only the teacher's logits: alpha_hidden, alpha_cosine and "
                "alpha_attention must be 0"
            )
        if self.steps < 0 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"steps={self.steps}, grad_accum={self.grad_accum}, warmup_steps={self.warmup_steps}: "
                "need steps >= 0, grad_accum >= 1, warmup_steps >= 0"
            )
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1 or self.max_grad_norm < 0:
            raise ValueError(
                f"lr={self.lr}, weight_decay={self.weight_decay}, min_lr_ratio={self.min_lr_ratio}, "
                f"max_grad_norm={self.max_grad_norm}: need lr > 0, weight_decay >= 0, 0 <= min_lr_ratio <= 1, "
                "max_grad_norm >= 0"
            )
        if self.trainable not in ("no-embeddings", "all"):
            raise ValueError(f"trainable={self.trainable!r}: must be 'no-embeddings' or 'all'")
        if not isinstance(self.dropout, bool):
            raise TypeError(f"dropout={self.dropout!r}: must be True or False")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast={self.autocast!r}: must be 'auto', 'bf16' or 'off'")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every}: must be >= 0")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds={self.max_seconds}: must be > 0 or None")


def check_keep(keep) -> tuple[int, ...]:
    """``keep`` as a tuple of block indices, checked to be ints, non-negative and strictly increasing
    (the range is checked against the model in :func:`qruntime.distill.make_student`)."""
    if isinstance(keep, (str, bytes)) or not hasattr(keep, "__iter__"):
        raise TypeError(f"keep={keep!r}: must be a sequence of block indices")
    keep = tuple(keep)
    if not keep:
        raise ValueError("keep=(): the student needs at least one block")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise TypeError(f"keep={keep}: block indices must be ints")
    repeated = sorted({i for i in keep if keep.count(i) > 1})
    if repeated:
        raise ValueError(f"keep={list(keep)}: block indices {repeated} are repeated")
    if any(i < 0 for i in keep):
        raise ValueError(f"keep={list(keep)}: block indices must be >= 0")
    if list(keep) != sorted(keep):
        raise ValueError(f"keep={list(keep)}: must be increasing (the student keeps the teacher's block order)")
    return keep
