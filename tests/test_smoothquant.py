"""SmoothQuant (w8a8-sq): the fold leaves the float model's function unchanged, it lowers the W8A8 error
where activations have outlier channels, and it is reported, validated and failure-safe."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import rel_error
from qruntime import CompressConfig, QuantConfig, compress
from qruntime.calibration.stats import collect_stats
from qruntime.recipes.presets import parse_preset
from qruntime.quant.smoothquant import apply, find_groups, fold, smoothing_scales


def _calib(vocab=128, n=4):
    torch.manual_seed(3)
    return [torch.randint(0, vocab, (1, 16)) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _outliers(model):
    """Outlier channels at the inputs of the smoothable layers, as in real LLMs."""
    torch.manual_seed(5)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("input_layernorm", "post_attention_layernorm", "ln_1", "ln_2")):
                module.weight[torch.randperm(module.weight.numel())[:4]] *= 40
    return model


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_fold_keeps_the_float_model(arch, request):
    model = _outliers(request.getfixturevalue(arch))
    targets = {n: m for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D") and "head" not in n}
    _, absmax = collect_stats(model, targets, _calib(), hessian=False, absmax=True, progress=False)
    groups, _ = find_groups(model, set(targets))
    assert groups
    for g in groups:
        g.scales = smoothing_scales(torch.stack([absmax[c] for c in g.consumers]).amax(0),
                                    [targets[c].weight if type(targets[c]).__name__ == "Linear" else targets[c].weight.t()
                                     for c in g.consumers], 0.5)
        assert g.scales.max() / g.scales.min() > 2  # the outliers are actually migrated
    ids = torch.randint(0, 128, (2, 12))
    before = _logits(model, ids)
    smoothed = copy.deepcopy(model)
    apply(smoothed, fold(model, groups))
    assert rel_error(_logits(smoothed, ids), before) < 1e-5  # fp32 rounding only
    assert not torch.equal(smoothed.state_dict()[next(k for k in model.state_dict() if "ln" in k or "norm" in k)],
                           model.state_dict()[next(k for k in model.state_dict() if "ln" in k or "norm" in k)])


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_smoothquant_lowers_the_w8a8_error_with_outliers(arch, request):
    model = _outliers(request.getfixturevalue(arch))
    ids = torch.randint(0, 128, (2, 16))
    ref = _logits(model, ids)
    plain, _ = compress(model, "w8a8-nosq", inplace=False, progress=False)
    smooth, report = compress(model, "w8a8-sq", _calib(), inplace=False, progress=False)
    e_plain, e_smooth = rel_error(_logits(plain, ids), ref), rel_error(_logits(smooth, ids), ref)
    assert e_smooth < 0.8 * e_plain, (e_plain, e_smooth)
    assert report.smoothing["alpha"] == 0.5 and report.smoothing["groups"]
    assert any("smoothquant" in layer.method for layer in report.layers)


def test_post_norm_bert_is_left_unsmoothed_with_the_reason(tiny_bert):
    q, report = compress(tiny_bert, "w8a8-sq", [{"input_ids": b} for b in _calib()], inplace=False, progress=False)
    assert report.smoothing["groups"] == []
    assert all("post-norm" in e["reason"] for e in report.smoothing["not_smoothed"])
    assert report.layers  # still quantized to W8A8


def test_smoothquant_with_gptq_and_failure_safety(tiny_llama, monkeypatch):
    model = _outliers(tiny_llama)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    q, report = compress(model, "w8a8-gptq-sq0.75", _calib(), inplace=False, progress=False)
    assert report.config == "w8a8-gptq-sq0.75" and report.smoothing["alpha"] == 0.75
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # inplace=False

    import qruntime.pipeline.compress

    def fail(*a, **k):
        raise RuntimeError("injected after smoothing was computed")

    monkeypatch.setattr(qruntime.pipeline.compress, "quantize_linear", fail)
    with pytest.raises(RuntimeError, match="injected"):
        compress(model, "w8a8-sq", _calib(), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # norms untouched too


def test_smoothquant_configuration_errors():
    assert parse_preset("w8a8-sq").smoothquant == 0.5 and parse_preset("w8a8-sq0.8").name == "w8a8-sq0.8"
    with pytest.raises(ValueError, match="SmoothQuant"):
        parse_preset("w8a16-sq")
    with pytest.raises(ValueError, match="smoothquant=1.5"):
        CompressConfig(quant=QuantConfig(bits=8, act_bits=8), smoothquant=1.5)
    with pytest.raises(ValueError, match="INT8 activations"):
        CompressConfig(quant=QuantConfig(bits=8), smoothquant=0.5)
    with pytest.raises(ValueError, match="needs calib_data"):
        compress(torch.nn.Sequential(torch.nn.Linear(4, 4)), "w8a8-sq")


def test_alpha_search_picks_the_smallest_sample_error(tiny_llama):
    model = _outliers(tiny_llama)
    ids = torch.randint(0, 128, (2, 16))
    ref = _logits(model, ids)
    q, report = compress(model, "w8a8-sqauto", _calib(), inplace=False, progress=False)
    assert report.config == "w8a8-sqauto" and report.smoothing["alpha"] == "auto"
    for g in report.smoothing["groups"]:
        errors = g["sample_error"]
        assert set(errors) == {"0.3", "0.4", "0.5", "0.6", "0.7", "0.8"}
        assert errors[f"{g['alpha']:g}"] == min(errors.values())
    fixed, _ = compress(model, "w8a8-sq", _calib(), inplace=False, progress=False)
    assert rel_error(_logits(q, ids), ref) < 1.2 * rel_error(_logits(fixed, ids), ref)
    assert "smoothquant alpha auto (used:" in report.table()
