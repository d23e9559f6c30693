"""compress() on tiny random-weight GPT-2 (Conv1D), BERT and Llama models built from their configs."""
import copy

import pytest
import torch
from torch import nn

import qruntime
from qruntime import CompressConfig, QuantConfig, QuantLinear, compress
from qruntime.eval.evaluate import sqnr_db
from qruntime.nn.modules import is_conv1d
from qruntime.quant.linear import quantize_linear


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before, types_before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert [type(m) for m in model.modules()] == types_before


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def _gpt2_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 24))}


@pytest.mark.parametrize("preset", ["w8a16", "w8a8-nosq", "w4a16-g32-rtn", "w4a16-g16-sym-rtn", "w4a16-rtn"])
@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_bert", "tiny_llama"])
def test_compress_converts_all_but_heads_and_runs(arch, preset, request):
    model = request.getfixturevalue(arch)
    inputs = _gpt2_inputs()
    with torch.no_grad():
        ref = model(**inputs).logits
    names = _linear_names(model)
    qmodel, report = compress(model, preset, progress=False)
    assert qmodel is model
    converted = {layer.name for layer in report.layers}
    skipped = {s.name: s.reason for s in report.skipped}
    assert converted | skipped.keys() == set(names) and not converted & skipped.keys()
    heads = {"tiny_gpt2": {"lm_head"}, "tiny_bert": {"classifier"}, "tiny_llama": {"lm_head"}}[arch]
    assert skipped.keys() == heads and all("exclude" in r for r in skipped.values())
    for name in converted:
        assert isinstance(model.get_submodule(name), QuantLinear)
    with torch.no_grad():
        out = model(**inputs).logits
    assert out.shape == ref.shape and torch.isfinite(out).all()
    # INT8 must be near-transparent; INT4 round-to-nearest on random weights is coarser but still close
    assert sqnr_db(ref, out) >= {"w8a16": 30, "w8a8-nosq": 25}.get(preset, 12)
    assert report.weight_bytes_after < report.weight_bytes_before
    assert all(l.format == qruntime.recipes.presets.parse_preset(preset).quant.name for l in report.layers)


def test_gpt2_conv1d_weight_is_transposed(tiny_gpt2):
    conv = tiny_gpt2.transformer.h[0].attn.c_attn  # Conv1D: weight [in=64, out=192]
    assert is_conv1d(conv) and conv.weight.shape == (64, 192)
    x = torch.randn(5, 64)
    q = quantize_linear(conv, QuantConfig(bits=8))
    assert (q.in_features, q.out_features) == (64, 192)
    assert sqnr_db(conv(x), q(x)) > 35


def test_int8_compression_ratio_and_report(tiny_llama):
    _, report = compress(tiny_llama, "w8a16", progress=False)
    # fp32 -> int8 codes + one fp32 scale per row: 4 K / (K + 4) with K = 96 or 160
    assert 3.8 < report.weight_compression < 4.0
    d = report.to_dict()
    assert d["config"] == "w8a16" and len(d["layers"]) == 14 and d["skipped"][0]["name"] == "lm_head"
    text = report.table()
    assert "skipped lm_head" in text and "w8a16" in text
    assert all(l.sqnr_db > 35 for l in report.layers)


def test_include_exclude_patterns(tiny_llama):
    cfg = CompressConfig(quant=QuantConfig(bits=8), include=("*.mlp.*",), exclude=("*down_proj", "lm_head"))
    _, report = compress(tiny_llama, cfg, progress=False)
    assert {l.name.rsplit(".", 1)[1] for l in report.layers} == {"gate_proj", "up_proj"}
    reasons = {s.name: s.reason for s in report.skipped}
    assert "include" in reasons["model.layers.0.self_attn.q_proj"]
    assert "'*down_proj'" in reasons["model.layers.1.mlp.down_proj"]


def test_inplace_false_leaves_original_untouched(tiny_gpt2):
    before, types = _state(tiny_gpt2), [type(m) for m in tiny_gpt2.modules()]
    qmodel, _ = compress(tiny_gpt2, "w8a16", inplace=False, progress=False)
    assert qmodel is not tiny_gpt2
    _assert_unchanged(tiny_gpt2, before, types)
    assert any(isinstance(m, QuantLinear) for m in qmodel.modules())


def test_compressing_twice_skips_quantized_layers(tiny_llama):
    compress(tiny_llama, "w8a16", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        compress(tiny_llama, "w8a16", progress=False)


@pytest.mark.parametrize(
    "config,exc,match",
    [
        ("w3a16", ValueError, "unknown preset 'w3a16'"),
        ("int8", ValueError, "unknown preset"),
        ("w4a16-g48", ValueError, "group_size=48: must be a power of two >= 16"),
        ("w4a16-g8", ValueError, "group_size=8"),
        ("w8a16-g128", ValueError, "INT8 is per-channel only"),
        ("w4a8", ValueError, "INT8 activations need INT8 weights"),
        ("w8a4", ValueError, "unknown preset"),
        (42, TypeError, "config=42"),
    ],
)
def test_bad_config_errors_and_model_unchanged(tiny_bert, config, exc, match):
    before, types = _state(tiny_bert), [type(m) for m in tiny_bert.modules()]
    with pytest.raises(exc, match=match):
        compress(tiny_bert, config, progress=False)
    _assert_unchanged(tiny_bert, before, types)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="group_size=48: must be a power of two >= 16"):
        QuantConfig(bits=4, group_size=48)
    with pytest.raises(ValueError, match="bits=3"):
        QuantConfig(bits=3)
    with pytest.raises(TypeError, match="include"):
        CompressConfig(include="*")
    assert qruntime.recipes.presets.parse_preset("w4a16-g128").quant == QuantConfig(bits=4, group_size=128, symmetric=False,
                                                                           method="gptq")
    assert qruntime.recipes.presets.parse_preset("W4A16-g64-sym-rtn").quant == QuantConfig(bits=4, group_size=64, symmetric=True)
    assert qruntime.recipes.presets.parse_preset("w8a8-gptq").quant == QuantConfig(bits=8, act_bits=8, method="gptq")
    assert QuantConfig(bits=8, act_bits=8).name == "w8a8"
    with pytest.raises(ValueError, match="act_bits=12: must be 16 or 8"):
        QuantConfig(act_bits=12)
    with pytest.raises(ValueError, match="bits=4 with act_bits=8"):
        QuantConfig(bits=4, act_bits=8)


def test_plain_presets_are_the_calibrated_recipes_the_issue_names():
    """Issue #5's preset list: plain ``w8a8`` is SmoothQuant and plain INT4 recipes are GPTQ; ``-nosq`` and
    ``-rtn`` are the data-free spellings; every full name parses back to its config."""
    from qruntime.recipes.config import data_free_variant
    from qruntime.recipes.presets import PRESETS, parse_preset

    assert parse_preset("w8a8").smoothquant == 0.5 and parse_preset("w8a8").quant.method == "rtn"
    assert parse_preset("w8a8-nosq").smoothquant is None and not parse_preset("w8a8-nosq").needs_calibration
    for group in ("", "-g32", "-g64", "-g128"):
        cfg = parse_preset(f"w4a16{group}")
        assert cfg.quant.method == "gptq" and cfg.quant.gptq_act_order and not cfg.quant.symmetric
        assert cfg == parse_preset(f"w4a16{group}-gptq") and cfg.name == f"w4a16{group}-asym-gptq"
        rtn = parse_preset(f"w4a16{group}-rtn")
        assert rtn.quant.method == "rtn" and not rtn.needs_calibration and data_free_variant(cfg) == rtn
    assert parse_preset("w8a16") == CompressConfig() and not parse_preset("w8a16").needs_calibration
    assert data_free_variant(parse_preset("w8a8-gptq-sqauto")) == parse_preset("w8a8-nosq")
    assert data_free_variant(parse_preset("w8a16")) is None
    for name in [*PRESETS, "w4a16-g128-budget0.02-float", "w8a8-sqauto-emb8"]:
        cfg = parse_preset(name)
        assert parse_preset(cfg.name) == cfg, name
        free = data_free_variant(cfg)
        assert free is None or (parse_preset(free.name) == free and not free.needs_calibration), name
    with pytest.raises(ValueError, match=r"'-sq' / '-nosq'\) is for INT8 activations"):
        parse_preset("w4a16-g128-nosq")


def test_plain_presets_compress_like_their_explicit_spellings(tiny_llama):
    calib = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    runs = {}
    for preset in ("w4a16-g32", "w4a16-g32-gptq", "w8a8", "w8a8-sq"):
        q, report = compress(copy.deepcopy(tiny_llama), preset, calib, progress=False)
        runs[preset] = (q.state_dict(), report)
    for plain, explicit in (("w4a16-g32", "w4a16-g32-gptq"), ("w8a8", "w8a8-sq")):
        (a, ra), (b, rb) = runs[plain], runs[explicit]
        assert ra.config == rb.config and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), plain
    assert all(layer.method.startswith("gptq") for layer in runs["w4a16-g32"][1].layers)
    assert runs["w8a8"][1].smoothing["alpha"] == 0.5 and runs["w8a8"][1].smoothing["groups"]
    with pytest.raises(ValueError, match="needs calib_data.*the data-free 'w8a8-nosq'"):
        compress(tiny_llama, "w8a8", progress=False)


def test_no_convertible_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no convertible layer in Sequential: found 0"):
        compress(model, progress=False)
    head_only = nn.ModuleDict({"lm_head": nn.Linear(8, 8)})
    with pytest.raises(ValueError, match="lm_head: matches exclude pattern"):
        compress(head_only, progress=False)


def test_non_float_weight_is_refused_and_model_unchanged(tiny_llama):
    layer = tiny_llama.model.layers[1].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().round().to(torch.int32), requires_grad=False)
    before, types = _state(tiny_llama), [type(m) for m in tiny_llama.modules()]
    with pytest.raises(TypeError, match="model.layers.1.mlp.up_proj.*int32 is not a floating-point"):
        compress(tiny_llama, "w8a16", progress=False)
    _assert_unchanged(tiny_llama, before, types)


def test_nan_weight_is_refused_and_model_unchanged(tiny_gpt2):
    with torch.no_grad():
        tiny_gpt2.transformer.h[1].mlp.c_proj.weight[3, 5] = float("nan")
    before = copy.deepcopy(tiny_gpt2)
    with pytest.raises(ValueError, match=r"transformer.h.1.mlp.c_proj.*1 NaN/Inf"):
        compress(tiny_gpt2, "w4a16-g32-rtn", progress=False)
    assert [type(m) for m in tiny_gpt2.modules()] == [type(m) for m in before.modules()]


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        compress({"weight": torch.ones(2, 2)})


@pytest.mark.parametrize("preset", ["w8a16", "w8a8-nosq", "w4a16-g32-rtn"])
def test_compressed_model_traces_with_torch_compile(tiny_llama, preset):
    compress(tiny_llama, preset, progress=False)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        eager = tiny_llama(ids).logits
        # fullgraph: the quantized layers' ops trace through their fake kernels, no graph break
        compiled = torch.compile(tiny_llama, backend="eager", fullgraph=True)(ids).logits
    assert torch.allclose(eager, compiled, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["w8a16", "w8a8-nosq", "w4a16-g32-rtn"])
def test_module_fast_path_equals_the_op(tiny_llama, preset):
    """Eager CPU calls skip the dispatcher; the op (used with autograd or compile) gives the same numbers."""
    compress(tiny_llama, preset, progress=False)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    x = torch.randn(3, 7, layer.in_features)
    with torch.no_grad():
        fast = layer(x)
    slow = layer(x.requires_grad_(True))  # needs a gradient: goes through the registered op
    assert torch.equal(fast, slow.detach())
    slow.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_bf16_model_runs_quantized(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits.float()
    compress(model, "w8a8-nosq", progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.bfloat16 and sqnr_db(ref, out.float()) > 20


def test_module_kernel_arguments_follow_load_state_dict_and_pickle(tiny_llama, tmp_path):
    """The module keeps its CPU kernel's arguments; a load_state_dict (in-place copy) must refresh them."""
    compress(tiny_llama, "w8a8-nosq", progress=False)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    other = quantize_linear(nn.Linear(layer.in_features, layer.out_features, bias=False), QuantConfig(bits=8, act_bits=8))
    x = torch.randn(4, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        layer.load_state_dict(other.state_dict())
        after, expected = layer(x), other(x)
    assert torch.equal(after, expected) and not torch.equal(after, before)
    torch.save(tiny_llama, tmp_path / "m.pt")  # the cached arguments are not pickled
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded.model.layers[0].self_attn.q_proj(x), expected)


@pytest.mark.parametrize("preset", ["w8a16", "w4a16-g32-rtn-emb4"])
def test_half_keeps_scales_float32(tiny_llama, preset):
    """model.half() after compress: bias and the model follow, the scales stay float32 (exact)."""
    compress(tiny_llama, preset, progress=False)
    layer = tiny_llama.model.layers[0].mlp.up_proj
    scales = layer.scales.clone()
    model = tiny_llama.half()
    assert layer.scales.dtype == torch.float32 and torch.equal(layer.scales, scales)
    emb = model.get_input_embeddings()
    ids = torch.randint(0, 128, (1, 6))
    assert emb(ids).dtype == torch.float16  # nn.Embedding or QuantEmbedding alike
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float16
