"""SmoothQuant / AWQ folds across norm families: Gemma's RMSNorm multiplies by (1 + weight), and Gemma 2/3
normalize the sublayers' outputs too (sandwich norms), so the fold must use the norm's offset and the norm
that actually feeds each group. The float model is unchanged by the fold, W8A8 with SmoothQuant is no
worse than without, and a norm that cannot be folded exactly is left alone and reported."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from conftest import rel_error
from qruntime import compress
from qruntime.quant.awq import awq_scales
from qruntime.calibration.stats import collect_stats
from qruntime.quant.smoothquant import apply, find_groups, norm_offset, plan_groups, plan_smoothing

# family -> (weight offset of its RMSNorm, the norm feeding gate/up)
FAMILIES = {
    "gemma": (1.0, "post_attention_layernorm"),
    "gemma2": (1.0, "pre_feedforward_layernorm"),
    "gemma3_text": (1.0, "pre_feedforward_layernorm"),
    "llama": (0.0, "post_attention_layernorm"),
}
SQNR_SLACK_DB = 1.0  # SmoothQuant may cost at most this much SQNR against plain W8A8


def _build(family: str):
    """A tiny random model of ``family`` whose norms' multipliers (offset + weight) are 1 + N(0, 0.3)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
                               max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    offset = FAMILIES[family][0]
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("layernorm"):
                module.weight.normal_(1.0 - offset, 0.3)
    return model


@pytest.fixture(params=list(FAMILIES))
def family_model(request):
    return request.param, _build(request.param)


def _calib(n=8):
    torch.manual_seed(3)
    return [torch.randint(0, 128, (1, 16)) for _ in range(n)]


def _heldout():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(11))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _sqnr_db(out, ref) -> float:
    ref, out = ref.double(), out.double()
    return 10 * math.log10(float(ref.pow(2).sum() / (out - ref).pow(2).sum()))


def _targets(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "head" not in n}


def _expected_producers(model, family):
    mlp_norm = FAMILIES[family][1]
    return {f"model.layers.{i}.{p}" for i in range(len(model.model.layers))
            for p in ("input_layernorm", mlp_norm, "mlp.up_proj")}


def _plan(model, method):
    """The folded tensors and report of SmoothQuant (alpha 0.5) or AWQ scaling (alpha 0.5: a fixed,
    non-trivial alpha, so the fold is exercised even where the search would keep s = 1)."""
    targets = _targets(model)
    hessians, absmax = collect_stats(model, targets, _calib(4), hessian=method == "awq",
                                     absmax=method == "smoothquant", progress=False)
    if method == "smoothquant":
        return plan_smoothing(model, targets, absmax, 0.5, hessians)

    def choose(group, weights):
        group.scales = awq_scales(torch.diagonal(hessians[group.consumers[0]][0]).sqrt(), 0.5)
        return {"alpha": 0.5}

    return plan_groups(model, targets, hessians, choose, {"method": "awq", "alpha": 0.5})


def test_norm_offset_is_read_off_the_forward(family_model):
    family, model = family_model
    norms = [m for n, m in model.named_modules() if n.endswith("layernorm")]
    assert norms and all(norm_offset(m) == FAMILIES[family][0] for m in norms)


@pytest.mark.parametrize("method", ["smoothquant", "awq"])
def test_fold_keeps_the_float_model(family_model, method):
    family, model = family_model
    tensors, report = _plan(model, method)
    assert {g["producer"] for g in report["groups"]} == _expected_producers(model, family)
    norms = [n for n in tensors if n.endswith("layernorm")]
    assert norms and all(not torch.equal(tensors[n]["weight"], model.get_submodule(n).weight) for n in norms)
    ids = _heldout()
    folded = copy.deepcopy(model)
    apply(folded, tensors)
    assert rel_error(_logits(folded, ids), _logits(model, ids)) < 1e-5  # fp32 rounding only


def test_smoothquant_is_no_worse_than_plain_w8a8_and_reported(family_model):
    family, model = family_model
    ids = _heldout()
    ref = _logits(model, ids)
    plain, _ = compress(model, "w8a8-nosq", inplace=False, progress=False)
    smooth, report = compress(model, "w8a8", _calib(), inplace=False, progress=False)
    db_plain, db_smooth = _sqnr_db(_logits(plain, ids), ref), _sqnr_db(_logits(smooth, ids), ref)
    assert db_smooth >= db_plain - SQNR_SLACK_DB, (family, db_plain, db_smooth)
    assert {g["producer"] for g in report.smoothing["groups"]} == _expected_producers(model, family)
    assert {e["layer"].rsplit(".", 1)[-1] for e in report.smoothing["not_smoothed"]} == {"o_proj"}
    assert any("smoothquant" in layer.method for layer in report.layers)


def test_awq_is_no_worse_than_without(family_model):
    family, model = family_model
    ids = _heldout()
    ref = _logits(model, ids)
    plain, _ = compress(model, "w4a16-g32-rtn", inplace=False, progress=False)
    scaled, report = compress(model, "w4a16-g32-rtn-awq", _calib(), inplace=False, progress=False)
    db_plain, db_scaled = _sqnr_db(_logits(plain, ids), ref), _sqnr_db(_logits(scaled, ids), ref)
    assert db_scaled >= db_plain - SQNR_SLACK_DB, (family, db_plain, db_scaled)
    assert {g["producer"] for g in report.smoothing["groups"]} <= _expected_producers(model, family)


class _ShiftedRMSNorm(torch.nn.Module):
    """x / rms(x) * (2 + weight): a form the fold does not know."""

    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (2.0 + self.weight)


def test_unknown_norm_form_is_refused_and_reported():
    model = _build("gemma")
    layer = model.model.layers[0]
    layer.input_layernorm = _ShiftedRMSNorm(layer.input_layernorm.weight)
    ids = _heldout()
    ref = _logits(model, ids)
    plain, _ = compress(model, "w8a8-nosq", inplace=False, progress=False)
    smooth, report = compress(model, "w8a8", _calib(), inplace=False, progress=False)
    refused = {e["layer"]: e["reason"] for e in report.smoothing["not_smoothed"]}
    for proj in ("q_proj", "k_proj", "v_proj"):
        reason = refused[f"model.layers.0.self_attn.{proj}"]
        assert "model.layers.0.input_layernorm not folded" in reason and "_ShiftedRMSNorm" in reason
    assert "model.layers.1.input_layernorm" in {g["producer"] for g in report.smoothing["groups"]}
    assert _sqnr_db(_logits(smooth, ids), ref) >= _sqnr_db(_logits(plain, ids), ref) - SQNR_SLACK_DB


def test_fold_the_dtype_cannot_hold_is_refused():
    """bfloat16 Gemma norm: (1 + w) / s - 1 with s ~ 50 keeps ~2 significant bits of the multiplier."""
    model = _build("gemma").to(torch.bfloat16)
    targets = _targets(model)

    def choose(group, weights):
        group.scales = torch.full((weights[0].shape[1],), 50.0)
        return {"alpha": 1.0}

    tensors, report = plan_groups(model, targets, {}, choose, {"method": "test", "alpha": 1.0})
    assert {g["producer"].rsplit(".", 1)[-1] for g in report["groups"]} == {"up_proj"}  # Linear: exact enough
    reasons = [e["reason"] for e in report["not_smoothed"] if "layernorm not folded" in e["reason"]]
    assert len(reasons) == 2 * 5 and all("torch.bfloat16" in r and "allowed" in r for r in reasons)
    assert not any(n.endswith("layernorm") for n in tensors)


def test_block_with_other_readers_is_refused():
    """A block holding a weight-bearing module outside the known layout (as Gemma 3n's laurel, which
    reads input_layernorm's output) may feed it from a norm: no group of that block is folded."""
    model = _build("gemma2")
    model.model.layers[0].laurel = torch.nn.Linear(64, 8)
    groups, reasons = find_groups(model, set(_targets(model)))
    assert all(not g.producer.startswith("model.layers.0.") for g in groups)
    layer1 = ("input_layernorm", "pre_feedforward_layernorm", "mlp.up_proj")
    assert {g.producer for g in groups} == {f"model.layers.1.{p}" for p in layer1}
    assert "['laurel']" in reasons["model.layers.0.self_attn.q_proj"]


def _leaky_norm_hook(block, args, kwargs, output):
    """The block's output plus its input_layernorm's output: a residual path that layouts do not know."""
    x = args[0] if args else kwargs["hidden_states"]
    extra = block.input_layernorm(x)
    return (output[0] + extra, *output[1:]) if isinstance(output, tuple) else output + extra


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g32-rtn-awq"])
def test_folds_are_checked_on_the_float_model_before_they_are_kept(recipe):
    """A block laid out as Llama's whose input_layernorm also feeds the residual stream: a fold into it would
    change the model. compress() runs the folded float model on a calibration batch first, folds nothing,
    and every consumer says why."""
    model = _build("llama")
    _, report = compress(model, recipe, _calib(), inplace=False, progress=False)
    check = report.smoothing["float_check"]
    assert report.smoothing["groups"] and check["rel_error"] < 1e-5 <= check["tolerance"]
    for layer in model.model.layers:
        layer.register_forward_hook(_leaky_norm_hook, with_kwargs=True)
    ids = _heldout()
    ref = _logits(model, ids)
    smooth, report = compress(model, recipe, _calib(), inplace=False, progress=False)
    check = report.smoothing["float_check"]
    assert report.smoothing["groups"] == [] and check["rel_error"] > check["tolerance"]
    reasons = {e["reason"] for e in report.smoothing["not_smoothed"] if "changed the float model" in e["reason"]}
    assert len(reasons) == 1 and "LlamaForCausalLM" in reasons.pop()
    assert not any(e["method"] in layer.method for layer in report.layers for e in [report.smoothing])
    plain, _ = compress(model, recipe.replace("w8a8", "w8a8-nosq").replace("-awq", ""), _calib(), inplace=False,
                        progress=False)
    assert torch.equal(_logits(smooth, ids), _logits(plain, ids))
    assert rel_error(_logits(smooth, ids), ref) < 0.5
