"""The support matrix: every model family a user may bring, through every stage of ``compress()``.

Each family is a tiny random-weight model built offline from its config (``AutoConfig.for_model``: 2
blocks, width 64; norm weights perturbed so that folds matter). Each cell either works, checked, or is
refused up front with an error that names the family and the stage. ``tests/test_support_matrix.py``
runs every cell; ``docs/models.md`` is rendered from the same cells and a test keeps it in step:

    python tests/support_matrix.py --write docs/models.md

What "checked" means for each stage is in :data:`STAGES` and on the rendered page.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

VOCAB, WIDTH, LAYERS = 128, 64, 2
BASE = dict(hidden_size=WIDTH, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (model_type, config overrides, "decoder" | "encoder")
FAMILIES: dict[str, tuple[str, dict, str]] = {
    "llama": ("llama", {}, "decoder"),
    "mistral": ("mistral", {}, "decoder"),
    "qwen2": ("qwen2", {}, "decoder"),
    "qwen3": ("qwen3", dict(head_dim=16), "decoder"),
    "granite": ("granite", {}, "decoder"),
    "gemma": ("gemma", dict(head_dim=16), "decoder"),
    "gemma2": ("gemma2", dict(head_dim=16), "decoder"),
    "gemma3_text": ("gemma3_text", dict(head_dim=16), "decoder"),
    "phi3": ("phi3", {}, "decoder"),
    "olmo2": ("olmo2", {}, "decoder"),
    "starcoder2": ("starcoder2", {}, "decoder"),
    "gpt2": ("gpt2", dict(n_embd=WIDTH, n_layer=LAYERS, n_head=4, n_positions=128), "decoder"),
    "gpt_neox": ("gpt_neox", dict(use_parallel_residual=True), "decoder"),
    "gpt_neox (sequential residual)": ("gpt_neox", dict(use_parallel_residual=False), "decoder"),
    "falcon (parallel, one norm)": ("falcon", dict(parallel_attn=True, new_decoder_architecture=False), "decoder"),
    "falcon (sequential)": ("falcon", dict(parallel_attn=False, new_decoder_architecture=False, alibi=True),
                            "decoder"),
    "falcon (new architecture, two norms)": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2),
                                             "decoder"),
    "opt": ("opt", dict(ffn_dim=128, word_embed_proj_dim=WIDTH), "decoder"),
    "opt (post-norm, as OPT-350m)": ("opt", dict(ffn_dim=128, word_embed_proj_dim=WIDTH,
                                                 do_layer_norm_before=False), "decoder"),
    "bloom": ("bloom", dict(n_layer=LAYERS, n_head=4), "decoder"),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2), "decoder"),
    "qwen2_moe": ("qwen2_moe", dict(_MOE, shared_expert_intermediate_size=64), "decoder"),
    "qwen3_moe": ("qwen3_moe", dict(_MOE, head_dim=16), "decoder"),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2), "decoder"),
    "bert": ("bert", {}, "encoder"),
    "roberta": ("roberta", {}, "encoder"),
    "xlm-roberta": ("xlm-roberta", {}, "encoder"),
    "electra": ("electra", dict(embedding_size=WIDTH), "encoder"),
    "distilbert": ("distilbert", dict(dim=WIDTH, n_layers=LAYERS, n_heads=4, hidden_dim=128), "encoder"),
    "deberta-v2": ("deberta-v2", {}, "encoder"),
    "modernbert": ("modernbert", dict(global_attn_every_n_layers=1, local_attention=16), "encoder"),
}

# SQNR bounds (dB of the compressed model's logits against the float model's, held-out random tokens) on
# these tiny random models; and how far a calibrated refinement may fall behind its plain baseline
MIN_SQNR_DB = {"w8a16": 30.0, "w8a8-nosq": 20.0, "int4": 8.0}
SLACK_DB = 1.0  # a refinement with a gain of ~0 on these outlier-free models may lose this much to noise
GPTQ_GAIN_DB = 2.0  # GPTQ over round-to-nearest on its own calibration tokens (3.4-9.8 dB measured)
FOLD_RTOL = 1e-5  # the folded float model's logits against the original (fp32 rounding)
DECODER_RTOL = 1e-4  # the decoder's logits against the model's forward (fp32 rounding, other op order)

STAGES = {
    "w8a16": "RTN INT8: every weight matrix converted or listed in `report.skipped` with its reason; "
             f"SQNR >= {MIN_SQNR_DB['w8a16']:g} dB",
    "w8a8 + SmoothQuant": f"the folds leave the float logits unchanged (rel. {FOLD_RTOL:g}); `w8a8-nosq` >= "
                          f"{MIN_SQNR_DB['w8a8-nosq']:g} dB, and `w8a8` (SmoothQuant) within {SLACK_DB:g} dB of it "
                          "or better (*)",
    "GPTQ INT4": f"`w4a16-g32` block by block: every weight converted or listed; >= {MIN_SQNR_DB['int4']:g} dB, "
                 f"and at least {GPTQ_GAIN_DB:g} dB over round-to-nearest (*)",
    "AWQ + clip": "the AWQ folds leave the float logits unchanged; `w4a16-g32-rtn-clip-awq` within "
                  f"{SLACK_DB:g} dB of `w4a16-g32-rtn` or better (*)",
    "2:4": f"`2:4` (SparseGPT): every converted weight is 2:4, and within {SLACK_DB:g} dB of `2:4-magnitude` "
           "or better (*)",
    "depth": "`d1+w8a16`: before training, the 1-block student computes the teacher with the other block "
             "skipped (rel. 1e-5); after quantization, decoders generate as their full forward does",
    "save/load": "`w4a16-g32` saved and loaded: every tensor and the logits bit-identical",
    "generate": "`w8a16` decoders: greedy `generate` with the KV cache gives the tokens of full forwards",
    "decoder": "`w8a16` decoders run by `qruntime.Decoder`: its logits at prefill and at each decoding step "
               f"within {DECODER_RTOL:g} (relative) of the model's own forward, and its greedy tokens those of "
               "full forwards; elsewhere the reason it refuses (`qruntime.generate` then runs Hugging Face's "
               "`generate` and warns why)",
}


@dataclass(frozen=True)
class Cell:
    ok: bool
    text: str  # "✓", or the refusal
    note: str = ""  # what the stage left alone: weights left in float, the folds made or why none


class Refused(Exception):
    """The stage refused the family up front (an error naming the family and the stage)."""


# ---------------------------------------------------------------------------------------------- models


def kind(family: str) -> str:
    return FAMILIES[family][2]


def build(family: str) -> nn.Module:
    """The family's tiny random-weight model (causal LM, or masked LM for encoders), norms perturbed."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    model_type, overrides, role = FAMILIES[family]
    cfg = AutoConfig.for_model(model_type, **(BASE | overrides))
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if role == "decoder" else AutoModelForMaskedLM
    model = cls.from_config(cfg).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            w = getattr(module, "weight", None)
            if "norm" in type(module).__name__.lower() and isinstance(w, torch.Tensor) and w.dim() == 1:
                w.add_(torch.randn_like(w) * 0.3)
    return model


def calib(n: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (1, 16), generator=g) for _ in range(n)]


def heldout() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(11))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def hidden(model: nn.Module, ids: torch.Tensor | None = None) -> torch.Tensor:
    """The last hidden state on the calibration tokens (default): the quantity the calibrated refinements
    (GPTQ, AWQ, clipping, SmoothQuant's scales, SparseGPT) improve, without the output head's own error."""
    with torch.no_grad():
        return model(torch.cat(calib()) if ids is None else ids, output_hidden_states=True).hidden_states[-1]


def sqnr_db(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    noise = float((out - ref).pow(2).sum())
    return math.inf if noise == 0 else 10 * math.log10(float(ref.pow(2).sum()) / noise)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------- checks


def compress(family: str, model: nn.Module, recipe, **kwargs):
    """qruntime.compress on a copy; a ValueError / NotImplementedError naming the family and the stage is
    a refusal, any other error a failure."""
    import qruntime

    try:
        return qruntime.compress(model, recipe, inplace=False, progress=False, **kwargs)
    except (ValueError, NotImplementedError) as err:
        raise Refused(str(err)) from err


def weight_matrices(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(module name, parameter name, module) of every Linear / Conv1D weight and every other parameter with
    two or more dims > 1 outside embedding tables, each tensor once."""
    seen, out = set(), []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if sum(d > 1 for d in p.shape) >= 2 and id(p) not in seen:
                seen.add(id(p))
                out.append((mname, pname, module))
    return out


def check_coverage(model: nn.Module, report) -> str:
    """Every weight matrix converted or listed in report.skipped with a reason; the note of the cell."""
    from qruntime.nn.targets import output_head

    head = output_head(model)
    converted = {layer.name for layer in report.layers}
    skipped = {s.name: s.reason for s in report.skipped}
    left = []
    for mname, pname, module in weight_matrices(model):
        if mname in converted:
            continue
        key = mname if pname == "weight" and f"{mname}.{pname}" not in skipped else f"{mname}.{pname}"
        reason = skipped.get(key) or skipped.get(mname)
        assert reason, f"{mname}.{pname} {tuple(module.weight.shape) if hasattr(module, 'weight') else ''} " \
                       "neither converted nor listed in report.skipped"
        if module is not head:
            left.append(key)
    if left and os.environ.get("QRUNTIME_MATRIX_VERBOSE"):
        print("left in float:", left)
    assert converted, "nothing converted"
    kinds = sorted({re.sub(r"\.\d+\.", ".N.", name) for name in left})
    return ", ".join(f"`{k}`" for k in kinds)


def check_fold(family: str, model: nn.Module, method: str) -> list[str]:
    """Folds SmoothQuant / AWQ scales (alpha 0.5, fixed so that the fold is exercised) into a copy; the float
    logits must not move. Returns the producers folded into, block index replaced by N."""
    from qruntime.nn.targets import select_targets
    from qruntime.quant.awq import awq_scales
    from qruntime.calibration.stats import collect_stats
    from qruntime.recipes.presets import resolve_config
    from qruntime.quant.smoothquant import apply, plan_groups, plan_smoothing

    targets = dict(select_targets(model, resolve_config("w8a8"))[0])
    hessians, absmax = collect_stats(model, targets, calib(4), hessian=method == "awq",
                                     absmax=method == "smoothquant", progress=False)
    if method == "smoothquant":
        tensors, report = plan_smoothing(model, targets, absmax, 0.5, hessians)
    else:
        def choose(group, weights):
            group.scales = awq_scales(torch.diagonal(hessians[group.consumers[0]][0]).sqrt(), 0.5)
            return {"alpha": 0.5}

        tensors, report = plan_groups(model, targets, hessians, choose, {"method": "awq", "alpha": 0.5})
    folded = copy.deepcopy(model)
    apply(folded, tensors)
    ids = heldout()
    err = rel(logits(folded, ids), logits(model, ids))
    assert err < FOLD_RTOL, f"{method} folds changed the float model: rel. error {err:.3g}"
    return sorted({re.sub(r"\.\d+\.", ".N.", g["producer"]) for g in report["groups"]})


def _fold_note(groups: int, model: nn.Module, report) -> str:
    if groups:
        return ", ".join(f"`{p.rsplit('.N.', 1)[-1]}`" for p in groups)
    reasons = sorted({e["reason"] for e in report.smoothing.get("not_smoothed", [])})
    return "none: " + (reasons[0].split(":")[0] if reasons else "no group")


def stage_w8a16(family, model):
    q, report = compress(family, model, "w8a16")
    note = check_coverage(model, report)
    db = sqnr_db(logits(q, heldout()), logits(model, heldout()))
    assert db >= MIN_SQNR_DB["w8a16"], f"w8a16 SQNR {db:.1f} dB"
    return note


def stage_w8a8(family, model):
    groups = check_fold(family, model, "smoothquant")
    plain, _ = compress(family, model, "w8a8-nosq")
    smooth, report = compress(family, model, "w8a8", calib_data=calib())
    check_coverage(model, report)
    db_plain = sqnr_db(logits(plain, heldout()), logits(model, heldout()))
    assert db_plain >= MIN_SQNR_DB["w8a8-nosq"], f"w8a8-nosq SQNR {db_plain:.1f} dB"
    db_plain, db = sqnr_db(hidden(plain), hidden(model)), sqnr_db(hidden(smooth), hidden(model))
    assert db >= db_plain - SLACK_DB, f"w8a8 {db:.1f} dB against w8a8-nosq {db_plain:.1f} dB"
    return _fold_note(groups, model, report)


def stage_gptq(family, model):
    rtn, _ = compress(family, model, "w4a16-g32-rtn")
    q, report = compress(family, model, "w4a16-g32", calib_data=calib())
    note = check_coverage(model, report)
    db = sqnr_db(logits(q, heldout()), logits(model, heldout()))
    assert db >= MIN_SQNR_DB["int4"], f"GPTQ SQNR {db:.1f} dB on held-out tokens"
    db_rtn, db = sqnr_db(hidden(rtn), hidden(model)), sqnr_db(hidden(q), hidden(model))
    assert db >= db_rtn + GPTQ_GAIN_DB, f"GPTQ {db:.1f} dB against RTN {db_rtn:.1f} dB on its calibration tokens"
    return note


def stage_awq(family, model):
    groups = check_fold(family, model, "awq")
    plain, _ = compress(family, model, "w4a16-g32-rtn")
    q, report = compress(family, model, "w4a16-g32-rtn-clip-awq", calib_data=calib())
    check_coverage(model, report)
    db_plain, db = sqnr_db(hidden(plain), hidden(model)), sqnr_db(hidden(q), hidden(model))
    assert db >= db_plain - SLACK_DB, f"AWQ + clip {db:.1f} dB against RTN {db_plain:.1f} dB"
    return _fold_note(groups, model, report)


def stage_sparse(family, model):
    magnitude, _ = compress(family, model, "2:4-magnitude")
    q, report = compress(family, model, "2:4", calib_data=calib())
    note = check_coverage(model, report)
    for layer in report.layers:
        w = q.get_submodule(layer.name).dequantized_weight()
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2, f"{layer.name} is not 2:4"
    db_mag, db = sqnr_db(hidden(magnitude), hidden(model)), sqnr_db(hidden(q), hidden(model))
    assert db >= db_mag - SLACK_DB, f"2:4 SparseGPT {db:.1f} dB against magnitude {db_mag:.1f} dB"
    return note


def _skip_block(model: nn.Module, index: int):
    """Hooks that make block ``index`` return its input: the teacher with that block dropped."""
    from qruntime.plumbing.model import find_blocks

    block = find_blocks(model).layers[index]

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs.get("hidden_states")
        return (x, *output[1:]) if isinstance(output, tuple) else x

    return block.register_forward_hook(hook, with_kwargs=True)


def stage_depth(family, model):
    from qruntime.distill.config import DistillConfig
    from qruntime.recipes.config import CompressConfig
    from qruntime.recipes.presets import resolve_config

    train = [{"input_ids": b} for b in calib(4)]
    student_cfg = DistillConfig(keep=(1,), steps=1, lr=1e-12, weight_decay=0.0, warmup_steps=0)
    try:
        import qruntime

        student, _ = qruntime.distill(model, None, train, student_cfg, progress=False)
    except (ValueError, NotImplementedError) as err:
        raise Refused(str(err)) from err
    skipped = copy.deepcopy(model)
    _skip_block(skipped, 0)
    err = rel(logits(student, heldout()), logits(skipped, heldout()))
    assert err < 1e-5, f"the untrained student differs from the teacher with block 0 skipped: {err:.3g}"
    cfg = CompressConfig(quant=resolve_config("w8a16").quant, distill=DistillConfig(num_layers=1, steps=2))
    q, report = compress(family, model, cfg, train_data=train)
    assert report.distillation["student_layers"] == 1
    if kind(family) == "decoder":
        check_generate(q)
    return ""


def check_generate(model: nn.Module, new: int = 6) -> None:
    """Greedy generate (KV cache, end-of-text suppressed as min_new_tokens does) against the argmax of
    full forwards without a cache."""
    prompt = heldout()[:1, :5]
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        ids = prompt
        for _ in range(new):
            step = model(ids, use_cache=False).logits[:, -1]
            step[:, eos] = -math.inf
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids), f"generate {out.tolist()} against full forwards {ids.tolist()}"


def stage_save_load(family, model):
    import qruntime

    q, report = compress(family, model, "w4a16-g32", calib_data=calib())
    with tempfile.TemporaryDirectory() as tmp:
        qruntime.save(q, Path(tmp) / "ckpt", report=report)
        loaded = qruntime.load(Path(tmp) / "ckpt")
    a, b = q.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert torch.equal(logits(q, heldout()), logits(loaded, heldout()))
    return ""


def stage_generate(family, model):
    if kind(family) != "decoder":
        return None  # not a stage of an encoder
    q, _ = compress(family, model, "w8a16")
    check_generate(q)
    return ""


def stage_decoder(family, model):
    """The qruntime decoder on the ``w8a16`` model (12 tokens: fp32 products on every CPU level), or its
    refusal."""
    from qruntime.runtime import Decoder, UnsupportedModelError

    if kind(family) != "decoder":
        return None
    q, _ = compress(family, model, "w8a16")
    try:
        dec = Decoder(q)
    except UnsupportedModelError as err:
        raise Refused(f"qruntime decoder: {str(err).split('; it reads')[0]}") from err
    ids = heldout()[:1, :12]
    ref = logits(q, ids)[0]
    errs = [rel(dec.prefill(ids[:, :5], all_logits=True), ref[:5])]
    errs += [rel(dec.step(ids[0, p])[0], ref[p]) for p in range(5, ids.shape[1])]
    assert max(errs) < DECODER_RTOL, f"decoder logits against the model's forward: rel. errors {errs}"
    prompt, want = ids[:, :5], ids[:, :5]
    for _ in range(6):
        want = torch.cat([want, logits(q, want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    got = dec.generate(prompt, 6, [])  # []: no end token stops it
    assert torch.equal(got, want), f"decoder greedy {got.tolist()} against full forwards {want.tolist()}"
    return ""


RUNNERS = {"w8a16": stage_w8a16, "w8a8 + SmoothQuant": stage_w8a8, "GPTQ INT4": stage_gptq,
           "AWQ + clip": stage_awq, "2:4": stage_sparse, "depth": stage_depth, "save/load": stage_save_load,
           "generate": stage_generate, "decoder": stage_decoder}


@functools.lru_cache(maxsize=None)
def cell(family: str, stage: str) -> Cell | None:
    """Runs one cell: a passed check gives "✓" (with a note), an up-front refusal gives its message; a
    failed check raises. None where the stage does not apply (generate on an encoder)."""
    model = build(family)
    try:
        note = RUNNERS[stage](family, model)
    except Refused as err:
        return Cell(False, str(err).splitlines()[0])
    if note is None:
        return None
    return Cell(True, "✓", note)


# ---------------------------------------------------------------------------------------------- page


def render(cells: dict[tuple[str, str], Cell | None]) -> str:
    import transformers

    lines = [
        "# Supported model families",
        "",
        "Generated by `python tests/support_matrix.py --write docs/models.md` from the checks of",
        "`tests/test_support_matrix.py`, which fails when this page and the checks disagree.",
        f"Measured with transformers {transformers.__version__}, on tiny random-weight models built offline",
        f"from each family's config ({LAYERS} blocks, width {WIDTH}, norm weights perturbed so that folds matter).",
        "",
        "A ✓ means the stage ran and passed its check; a note says what it left alone (and lists in",
        "`report.skipped`). Any other entry is the error the stage raises up front. What each stage checks",
        "(SQNR: of the logits on held-out random tokens; (*): of the last hidden state on the calibration",
        "tokens, the quantity the calibrated methods improve):",
        "",
    ]
    lines += [f"- **{s}**: {d}" for s, d in STAGES.items()]
    lines += ["", "| family | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
    for family in FAMILIES:
        row = [cells[(family, s)].text if cells[(family, s)] else "n/a" for s in STAGES]
        lines.append(f"| {family} | " + " | ".join(t.replace("|", "\\|") for t in row) + " |")
    lines += ["", "## What each family leaves alone", "",
              "Folds: the norms and Linears of each block that SmoothQuant / AWQ scales fold into, or why none. "
              "Left in float: the weight matrices, other than the output head, that every recipe lists in "
              "`report.skipped` with their reason and bytes.", "",
              "| family | folds | left in float |", "|---|---|---|"]
    for family in FAMILIES:
        folds, left = cells[(family, "w8a8 + SmoothQuant")], cells[(family, "w8a16")]
        lines.append(f"| {family} | {folds.note if folds and folds.ok else '-'} | "
                     f"{(left.note if left and left.ok else '') or '-'} |")
    return "\n".join(lines) + "\n"


def all_cells() -> dict[tuple[str, str], Cell | None]:
    return {(f, s): cell(f, s) for f in FAMILIES for s in STAGES}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--write":
        sys.exit("usage: python tests/support_matrix.py --write docs/models.md")
    Path(sys.argv[2]).write_text(render(all_cells()))
