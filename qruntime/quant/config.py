"""The recipe of one layer's quantization: :class:`QuantConfig` (its format, and how the codes are chosen).

Imports: :mod:`qruntime.formats` (the format it produces).
"""
from __future__ import annotations

from dataclasses import dataclass

from qruntime.formats.packing import WeightFormat

__all__ = ["QuantConfig", "CLIP_METHODS", "DEFAULT_TUNE_STEPS", "check_tune", "tune_suffix"]

# steps of "-tune" without a number (QuantConfig.tune_steps)
DEFAULT_TUNE_STEPS = 64


def check_tune(steps, lr) -> None:
    """The ``tune_steps`` / ``tune_lr`` fields of QuantConfig and SparsityConfig."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"tune_steps={steps!r}: must be an int >= 0 (0: no tuning)")
    if not (isinstance(lr, (int, float)) and 0 < lr <= 0.1):
        raise ValueError(f"tune_lr={lr!r}: must be in (0, 0.1]")


def tune_suffix(steps: int, default: int) -> str:
    """The preset suffix of ``steps`` tuning steps: "" (off), "-tune" (the default) or "-tune<steps>"."""
    return "" if not steps else ("-tune" if steps == default else f"-tune{steps}")


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
        clip: how each group's (INT4) or row's (INT8) range is set (:mod:`qruntime.quant.clip`): ``"none"``
            (its min and max, round to nearest's grid), ``"mse"`` (shrunk to minimize the weight's
            squared rounding error; no data) or ``"act"`` (shrunk to minimize the error weighted by each
            input column's mean squared activation; needs calibration data). Same packed format; with
            GPTQ the codes are chosen on the searched grid.
        sequential: calibrated methods (GPTQ, clip "act") run block by block: each block's layers are
            calibrated on the outputs of the blocks before them *as quantized* (:mod:`qruntime.calibration.blockwise`;
            about three forward passes of the calibration data instead of one). False: one pass of the
            float model.
        tune_steps: after each block is quantized, its layers' scales are tuned for this many Adam steps
            (one calibration window each) to bring the block's output closer to the float model's
            output of that block (:mod:`qruntime.quant.tune`; codes, zero points and format unchanged; kept
            only if the block's error on held-out calibration windows went down). 0: off. Needs
            calibration data and ``sequential``.
        tune_lr: the Adam learning rate of that tuning, on the relative change of each scale.
        tune_rounding: the tuning trains the codes too: each may move to the other grid point next to the
            value it was rounded from (GPTQ's error-compensated weight, or the weight), through a
            rounding offset in [-1/2, 1/2] (:class:`qruntime.quant.tune._RoundedWeight`; Adam learning rate
            :data:`qruntime.quant.tune.ROUND_LR`). Same format. Needs ``tune_steps``.
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
        self.format  # the format's own checks
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"method={self.method!r}: must be 'rtn' or 'gptq'")
        if not 0 <= self.gptq_damp < 1:
            raise ValueError(f"gptq_damp={self.gptq_damp}: must be in [0, 1)")
        if self.gptq_block_size < 1:
            raise ValueError(f"gptq_block_size={self.gptq_block_size}: must be >= 1")
        if self.clip not in CLIP_METHODS:
            raise ValueError(f"clip={self.clip!r}: must be one of {list(CLIP_METHODS)}")
        check_tune(self.tune_steps, self.tune_lr)
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
    def format(self) -> WeightFormat:
        """The packed format this recipe produces (what a module stores)."""
        return WeightFormat(self.bits, self.group_size, self.symmetric, self.act_bits)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq" or self.clip == "act" or self.tune_steps > 0

    @property
    def name(self) -> str:
        s = self.format.name  # w<bits>a<act bits>[-g<group>][-sym|-asym], then how the codes are chosen
        if self.method != "rtn" or self.bits == 4:  # INT4 states its rounding (plain presets are GPTQ)
            s += f"-{self.method}"
        s += CLIP_METHODS[self.clip]
        return s + tune_suffix(self.tune_steps, DEFAULT_TUNE_STEPS) + ("-round" if self.tune_rounding else "")

