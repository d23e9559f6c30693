"""Mixed precision under an accuracy budget (max_ppl_increase): the result respects its budget on the data
it was measured on, the search is the smallest promotion that does, the model is restored on failure, and
everything is reported."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qruntime import QuantLinear, compress
from qruntime.recipes.presets import AUTO_PRESET, parse_preset
from qruntime.quant.budget import budget_search, perplexity, swapped


def _outliers(model):
    """Loud input channels (as in real LLMs) and confident predictions: perplexity then measures
    something, and quantization raises it."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("input_layernorm", "post_attention_layernorm")):
                module.weight[torch.randperm(module.weight.numel())[:3]] *= 30
        model.model.norm.weight.fill_(10.0)
    return model


def _calib(n=4, vocab=128):
    return [torch.randint(0, vocab, (1, 32)) for _ in range(n)]


def _sampled(model, n=4):
    """Text the model itself writes: on it the original is the best model in expectation (E[-log q] =
    H(p) + KL(p || q)), so a quantized model's perplexity is higher, as on real text for a real LM."""
    start = torch.randint(0, model.config.vocab_size, (n, 1))
    with torch.no_grad():
        out = model.generate(start, do_sample=True, top_k=0, max_new_tokens=31, min_new_tokens=31, pad_token_id=0)
    return list(out[:, None, :])


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m).__name__ for m in model.modules()]


def test_perplexity_is_exp_of_the_mean_next_token_loss(tiny_llama):
    batches = _calib(2)
    with torch.no_grad():
        losses = [tiny_llama(b, labels=b).loss.item() for b in batches]
    assert perplexity(tiny_llama, batches) == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    masked = {"input_ids": batches[0], "attention_mask": torch.ones_like(batches[0])}
    assert perplexity(tiny_llama, [masked]) == pytest.approx(math.exp(losses[0]), rel=1e-5)


def test_search_finds_the_smallest_promotion_with_few_measurements():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(20)])
    names = [str(i) for i in range(20)]
    low = {n: nn.Identity() for n in names}
    high = {n: model.get_submodule(n) for n in names}
    sens = {n: 20.0 - i for i, n in enumerate(names)}  # layer 0 most sensitive

    def measure(m, batches):  # ppl falls by 1 per promoted layer, from 30 to 10
        return 10.0 + sum(isinstance(layer, nn.Identity) for layer in m)

    promoted, report = budget_search(model, low, high, sens, {}, [None], 0.35, progress=False, measure=measure)
    # reference 10 (nothing swapped); limit 13.5: the 17 most sensitive must be promoted (3 left low -> 13)
    assert promoted == set(names[:17]) and report["promoted"] == names[:17]
    assert report["met"] and report["perplexity"] == 13.0 and len(report["trials"]) <= math.ceil(math.log2(21)) + 2
    assert all(isinstance(layer, nn.Linear) for layer in model)  # restored after every trial


def test_swapped_restores_modules_and_parameters_on_error(tiny_llama):
    before = _state(tiny_llama)
    norm = "model.layers.0.input_layernorm"
    with pytest.raises(RuntimeError, match="boom"):
        with swapped(tiny_llama, {"model.layers.0.mlp.up_proj": nn.Identity()},
                     {norm: {"weight": torch.zeros_like(tiny_llama.get_submodule(norm).weight)}}):
            assert isinstance(tiny_llama.get_submodule("model.layers.0.mlp.up_proj"), nn.Identity)
            raise RuntimeError("boom")
    after = _state(tiny_llama)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())


@pytest.mark.parametrize("awq", [False, True])
def test_compress_respects_the_budget_on_its_data(tiny_llama, awq):
    model = _outliers(tiny_llama)
    calib = _sampled(model)
    suffix = "-awq" if awq else ""
    ref = perplexity(model, calib)
    low, _ = compress(model, f"w4a16-rtn{suffix}", calib, inplace=False, progress=False)
    increase = perplexity(low, calib) / ref - 1
    assert increase > 0.01, increase  # per-channel INT4 with outliers: the budget has work to do
    budget = increase / 4
    q, report = compress(model, f"w4a16-rtn{suffix}", calib, inplace=False, progress=False, max_ppl_increase=budget)
    b = report.budget
    assert b["met"] and b["max_ppl_increase"] == budget and b["data"] == "calibration data"
    assert 0 < len(b["promoted"]) < b["layers"]
    measured = perplexity(q, calib)  # the returned model, measured independently
    assert measured == pytest.approx(b["perplexity"], rel=1e-6) and measured <= ref * (1 + budget)
    assert b["reference_perplexity"] == pytest.approx(ref, rel=1e-6)
    fmt = {layer.name: layer.format for layer in report.layers}
    for name in b["promoted"]:
        assert isinstance(q.get_submodule(name), QuantLinear) and q.get_submodule(name).weight_format.bits == 8
        assert fmt[name] == "w8a16" and "accuracy budget" in next(l.method for l in report.layers if l.name == name)
    others = [n for n in fmt if n not in b["promoted"]]
    assert others and all(q.get_submodule(n).weight_format.bits == 4 for n in others)
    # with one layer fewer promoted, the budget was measured to fail (the search is minimal)
    fewer = [t for t in b["trials"] if t["promoted"] == len(b["promoted"]) - 1]
    assert fewer and fewer[0]["perplexity"] > ref * (1 + budget)
    assert "accuracy budget: perplexity x" in report.table() and "met" in report.table()
    assert "accuracy budget" in report.stages


def test_float_fallback_leaves_layers_unconverted_and_lists_them(tiny_llama):
    model = _outliers(tiny_llama)
    calib = _sampled(model)
    q, report = compress(model, "w4a16-budget0.000001-float", calib, inplace=False, progress=False)
    b = report.budget
    assert b["fallback"] == "float" and len(b["promoted"]) >= 1
    skipped = {s.name: s.reason for s in report.skipped}
    for name in b["promoted"]:
        assert type(q.get_submodule(name)) is nn.Linear
        assert skipped[name].startswith("kept in float by the accuracy budget")
    assert not {layer.name for layer in report.layers} & set(b["promoted"])


def test_unreachable_budget_says_not_met(tiny_llama, monkeypatch):
    import qruntime.quant.budget

    real = qruntime.quant.budget.perplexity

    def harsh(model, batches):  # any quantized layer costs 50%: even all-INT8 misses any budget below it
        return real(model, batches) * (1.5 if any(isinstance(m, QuantLinear) for m in model.modules()) else 1.0)

    monkeypatch.setattr(qruntime.quant.budget, "perplexity", harsh)
    model = _outliers(tiny_llama)
    _, report = compress(model, "w4a16", _sampled(model), inplace=False, progress=False, max_ppl_increase=0.3)
    b = report.budget
    assert not b["met"] and len(b["promoted"]) == b["layers"] and "NOT met" in report.table()
    assert [t["promoted"] for t in b["trials"]] == [0, b["layers"]]  # measured both ends, nothing between


def test_budget_errors_leave_the_model_untouched(tiny_bert, tiny_llama):
    before = _state(tiny_bert)
    with pytest.raises(ValueError, match=r"returns no per-token logits \[batch, seq, vocab\] \(found shape"):
        compress(tiny_bert, "w8a16", [{"input_ids": b} for b in _calib()], progress=False, max_ppl_increase=0.02)
    after = _state(tiny_bert)
    assert after[1] == before[1] and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    with pytest.raises(ValueError, match="needs calib_data"):
        compress(tiny_llama, "w4a16", progress=False, max_ppl_increase=0.02)
    with pytest.raises(ValueError, match=r"max_ppl_increase=-0.1: must be a number in \(0, 10\)"):
        compress(tiny_llama, "w4a16", _calib(), progress=False, max_ppl_increase=-0.1)
    with pytest.raises(ValueError, match="does not apply to 2:4 recipes"):
        compress(tiny_llama, "2:4", _calib(), progress=False, max_ppl_increase=0.02)
    with pytest.raises(ValueError, match="fallback='int4'"):
        parse_preset("w4a16").__class__(fallback="int4")


def test_auto_preset():
    cfg = parse_preset("auto")
    assert cfg == parse_preset(AUTO_PRESET) and cfg.max_ppl_increase == 0.02 and cfg.quant.method == "gptq"
    assert cfg.quant.clip == "act" and cfg.needs_calibration


def test_fisher_sensitivity_is_quadratic_leaves_no_gradients_and_ranks_like_measurement(tiny_llama):
    from qruntime.quant.budget import fisher_sensitivity
    from qruntime.nn.modules import linear_weight

    model = _outliers(tiny_llama)
    batches = _sampled(model)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "head" not in n]
    q, _ = compress(model, "w4a16-rtn", inplace=False, progress=False)
    deltas = {n: linear_weight(model.get_submodule(n)).float() - q.get_submodule(n).dequantized_weight() for n in names}
    base = fisher_sensitivity(model, deltas, batches)
    double = fisher_sensitivity(model, {n: 2 * d for n, d in deltas.items()}, batches)
    zero = fisher_sensitivity(model, {n: torch.zeros_like(d) for n, d in deltas.items()}, batches)
    for n in names:
        assert base[n] > 0 and zero[n] == 0
        assert double[n] == pytest.approx(4 * base[n], rel=1e-4)
    assert all(p.grad is None for p in model.parameters())
    # the estimate ranks layers like the measured loss increase of quantizing each one alone
    ref = math.log(perplexity(model, batches))
    measured = {}
    for n in names:
        with swapped(model, {n: q.get_submodule(n)}, {}):
            measured[n] = math.log(perplexity(model, batches)) - ref
    top_estimated = sorted(names, key=lambda n: -base[n])[:4]
    top_measured = sorted(names, key=lambda n: -measured[n])[:4]
    assert len(set(top_estimated) & set(top_measured)) >= 2, (top_estimated, top_measured)
