"""The preset names users type, parsed into a :class:`~qruntime.recipes.config.CompressConfig`.

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
                          (w4a16-g128-gptq-clip-tune-awq); "-tune-round": the
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

The suffixes of a weight recipe may come in any order, each at most once, with "-round" right after
"-tune[<steps>]" and "-float" right after "-budget<x>" (:mod:`qruntime.recipes.grammar`); full names write
them in the order above.

Group sizes are powers of two >= 16. With "a16" the activations stay in the model's float dtype;
"a8" (INT8 weights only) quantizes each token's activations to INT8 with its own scale at run time.

The defaults: ``w8a8`` is SmoothQuant and the INT4 recipes are GPTQ, so both need calibration data; ``w8a16`` (the default of :func:`qruntime.compress`) needs none.
The data-free variants are spelled out: ``w8a8-nosq``, ``w4a16-g128-rtn``. Full names
(:attr:`CompressConfig.name`, the report's ``config``) always state the INT4 rounding (``-rtn`` /
``-gptq``) and the W8A8 smoothing (``-sq`` / ``-nosq``), and parse back to the same config.
"""
from __future__ import annotations

import re
from dataclasses import replace

from qruntime.distill.config import DistillConfig
from qruntime.quant.config import DEFAULT_TUNE_STEPS, QuantConfig

from .config import DEFAULT_SPARSE_TUNE_STEPS, CompressConfig, SparsityConfig
from .grammar import WeightRecipe, parse_weight_recipe

__all__ = ["PRESETS", "AUTO_PRESET", "parse_preset", "resolve_config", "embedding_config"]


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
    text = name.strip().lower()
    if text == "auto":
        return parse_preset(AUTO_PRESET)
    depth = re.fullmatch(r"d(\d+)\+(.+)", text)
    if depth is not None:
        return replace(parse_preset(depth[2]), distill=DistillConfig(num_layers=int(depth[1])))
    if text.startswith(("2:", "4:")):
        return _parse_sparse(name, text)
    if not re.match(r"w\d", text):
        raise ValueError(
            f"unknown preset {name!r}: expected one of {sorted(PRESETS)} or the form "
            "'w8a16' / 'w8a8' / 'w4a16[-g<group>][-sym|-asym]' with optional suffixes in any order: '-rtn' or "
            "'-gptq', '-mse' or '-clip', '-tune[<steps>][-round]', '-awq', '-sq[<alpha>|auto]' or '-nosq' (w8a8), "
            "'-emb8|4', '-budget<x>[-float]'"
        )
    return _weight_config(name, parse_weight_recipe(text))


_SPARSE_RE = re.compile(r"2:4(?:-(magnitude|wanda|sparsegpt))?(?:-tune(\d+)?(?P<tuneflag>))?(-kd)?(?:\+(.+))?")


def _parse_sparse(name: str, text: str) -> CompressConfig:
    """``2:4[-<mask>][-tune[<steps>]][-kd][+<weight recipe>]``."""
    sparse = _SPARSE_RE.fullmatch(text)
    if sparse is None:
        raise ValueError(
            f"unknown preset {name!r}: sparse recipes are '2:4[-magnitude|-wanda|-sparsegpt][-tune[<steps>]][-kd][+<weight recipe>]'; "
            "other N:M patterns (e.g. 4:8) have no kernels: use qruntime.sparse.prune.prune_model for them"
        )
    tune = parse_tune(name, sparse["tuneflag"], sparse[2], DEFAULT_SPARSE_TUNE_STEPS)
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


def _weight_config(name: str, r: WeightRecipe) -> CompressConfig:
    """The CompressConfig of a weight recipe's fields (:mod:`qruntime.recipes.grammar`)."""
    if r.act_bits == 8 and r.bits != 8:
        raise ValueError(f"preset {name!r}: INT8 activations need INT8 weights (w8a8)")
    if r.bits == 8 and r.sym == "asym":
        raise ValueError(f"preset {name!r}: INT8 weights are symmetric only")
    method = r.method or ("gptq" if r.bits == 4 else "rtn")  # plain INT4 presets are GPTQ
    clip = {"mse": "mse", "clip": "act", None: "none"}[r.clip]
    tune = parse_tune(name, r.tune, r.tune, DEFAULT_TUNE_STEPS)
    quant = QuantConfig(bits=r.bits, group_size=r.group, symmetric=r.bits == 8 or r.sym == "sym", method=method,
                        act_bits=r.act_bits, clip=clip, tune_steps=tune, tune_rounding=r.round)
    if (r.sq is not None or r.nosq) and r.act_bits != 8:
        raise ValueError(f"preset {name!r}: SmoothQuant ('-sq' / '-nosq') is for INT8 activations (w8a8)")
    smoothquant = None
    if r.act_bits == 8 and not r.nosq:  # plain "w8a8" is SmoothQuant at alpha 0.5
        smoothquant = "auto" if r.sq == "auto" else (float(r.sq) if r.sq else 0.5)
    if r.awq and r.act_bits != 16:
        raise ValueError(f"preset {name!r}: AWQ ('-awq') is for weight-only recipes (w8a16 / w4a16); W8A8 has '-sq'")
    return CompressConfig(quant=quant, embeddings=embedding_config(int(r.emb), quant) if r.emb else None,
                          smoothquant=smoothquant, awq=r.awq,
                          max_ppl_increase=float(r.budget) if r.budget else None,
                          fallback="float" if r.float else "w8a16")


def parse_tune(name: str, flag: str | None, digits: str | None, default: int) -> int:
    """Steps of a preset's "-tune[<steps>]" (``flag`` None: no suffix, 0 steps)."""
    if flag is None:
        return 0
    steps = int(digits) if digits else default
    if steps < 1:
        raise ValueError(f"preset {name!r}: '-tune<steps>' needs steps >= 1")
    return steps

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

