"""The bad-input matrix (docs/robustness.md): every public entry point x every kind of bad input gives a
clear exception naming the value, or the documented fallback; never a crash, never a silently wrong
result. Each row of CASES is one row of the table in docs/robustness.md (checked below)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import require_module

import qruntime
from qruntime import CheckpointError, QuantConfig, QuantLinear, WeightFormat, compress
from qruntime.ops import registry as ops
from qruntime.formats.packing import quantize_int4, quantize_int8_per_channel
from qruntime.quant.linear import quantize_linear


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                        max_position_embeddings=32)).eval()


class _Encoder(nn.Module):
    """Returns hidden states, no logits (an encoder)."""

    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(16, 8), nn.Linear(8, 8)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


def _with(model, edit):
    edit(model)
    return model


def _nan_weight(model):
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")


def _int_weight(model):
    layer = model.model.layers[0].mlp.up_proj
    layer.weight = nn.Parameter(layer.weight.detach().round().to(torch.int32), requires_grad=False)


def _meta_weight(model):
    model.model.layers[0].mlp.up_proj.to("meta")


def _nan_embeds():
    e = torch.randn(1, 6, 32)
    e[0, 2, 5] = float("nan")
    return [{"inputs_embeds": e}]


Q8 = quantize_int8_per_channel(torch.randn(8, 32))
Q4 = quantize_int4(torch.randn(8, 64), 32, False)
X = torch.randn(3, 32)


def _saved(tmp_path):
    q, _ = compress(_llama(), "w8a16", progress=False)
    qruntime.save(q, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _flip(path):
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    return path


def _device_mix(tmp_path):
    require_module("triton", "Triton (the test extra) is not installed")
    from qruntime.ops import triton_backend

    triton_backend.load("w8a16").w8a16_linear(X, *Q8, torch.empty(8, device="meta"))


def _cli(*argv):
    from qruntime.cli import main

    return main(list(argv))


# (id, entry point, bad input, call(tmp_path), exception type, message regex)
CASES = [
    ("compress-not-module", "compress", "not an nn.Module", lambda t: compress({"w": torch.ones(2)}),
     TypeError, r"expected a torch.nn.Module, got dict"),
    ("compress-unknown-recipe", "compress", "unknown recipe name", lambda t: compress(_llama(), "w5a16"),
     ValueError, r"w5a16"),
    ("config-bits", "QuantConfig", "out-of-range bits", lambda t: QuantConfig(bits=3),
     ValueError, r"bits=3: must be 8 or 4"),
    ("config-group", "QuantConfig", "group size not a power of two", lambda t: QuantConfig(bits=4, group_size=48),
     ValueError, r"group_size=48"),
    ("config-int8-asym", "QuantConfig", "unsupported combination", lambda t: QuantConfig(bits=8, symmetric=False),
     ValueError, r"symmetric=False"),
    ("config-smoothquant", "compress", "SmoothQuant on weight-only activations", lambda t: compress(_llama(), "w8a16-sq"),
     ValueError, r"SmoothQuant \('-sq' / '-nosq'\) is for INT8 activations"),
    ("config-clip", "QuantConfig", "unknown clipping method", lambda t: QuantConfig(clip="percentile"),
     ValueError, r"clip='percentile': must be one of"),
    ("config-awq", "compress", "AWQ on INT8 activations", lambda t: compress(_llama(), "w8a8-awq"),
     ValueError, r"AWQ \('-awq'\) is for weight-only recipes"),
    ("config-tune", "compress", "scale tuning on INT8 activations", lambda t: compress(_llama(), "w8a8-tune"),
     ValueError, r"tune_steps=64 with act_bits=8"),
    ("config-tune-sparse", "compress", "scale tuning of 2:4 kept values", lambda t: compress(_llama(), "2:4+w8a16-tune"),
     ValueError, r"scale tuning is not implemented for 2:4 kept values"),
    ("config-round", "QuantConfig", "learned rounding without block tuning", lambda t: QuantConfig(bits=4, tune_rounding=True),
     ValueError, r"tune_rounding=True with tune_steps=0"),
    ("compress-device", "compress", "a device name torch does not know", lambda t: compress(_llama(), "w8a16", device="gpu0"),
     ValueError, r"device='gpu0': not a torch device"),
    ("compress-calib-precision", "compress", "an unknown calibration precision",
     lambda t: compress(_llama(), "w8a16", calib_precision="fp8"), ValueError, r"calib_precision='fp8': must be one of"),
    ("compress-budget-encoder", "compress", "accuracy budget on a model without per-token logits",
     lambda t: compress(_Encoder(), "w8a16", [torch.randint(0, 16, (1, 6))], max_ppl_increase=0.02),
     ValueError, r"no per-token logits \[batch, seq, vocab\]"),
    ("compress-int-weight", "compress", "integer weight dtype", lambda t: compress(_with(_llama(), _int_weight), "w8a16"),
     TypeError, r"up_proj.*torch.int32 is not a floating-point dtype"),
    ("compress-inf-weight", "compress", "NaN/Inf in weights", lambda t: compress(_with(_llama(), _nan_weight), "w4a16-g32-rtn"),
     ValueError, r"up_proj.*1 NaN/Inf values"),
    ("compress-meta-weight", "compress", "weights not loaded (meta device)",
     lambda t: compress(_with(_llama(), _meta_weight), "w8a16"), ValueError, r"up_proj.*meta device"),
    ("compress-no-calib", "compress", "calibrated recipe without data", lambda t: compress(_llama(), "w4a16-g32-gptq"),
     ValueError, r"needs calib_data"),
    ("compress-no-calib-plain", "compress", "a plain INT4 / W8A8 preset (GPTQ / SmoothQuant) without data",
     lambda t: compress(_llama(), "w4a16-g32"), ValueError, r"needs calib_data.*the data-free 'w4a16-g32-asym-rtn'"),
    ("compress-empty-calib", "compress", "empty calibration data", lambda t: compress(_llama(), "w4a16-g32-gptq", []),
     ValueError, r"yielded no batches"),
    ("compress-nan-calib", "compress", "NaN/Inf in calibration data",
     lambda t: compress(_llama(), "w4a16-g32-gptq", _nan_embeds()), ValueError, r"non-finite activations at the input of layer"),
    ("compress-bad-batch", "compress", "calibration batch of a wrong type",
     lambda t: compress(_llama(), "w4a16-g32-gptq", ["some text"]), TypeError, r"calibration batch of type str"),
    ("compress-calib-vocab", "compress", "calibration ids outside the vocabulary (another model's tokenizer)",
     lambda t: compress(_llama(), "w4a16-g32-gptq", [torch.tensor([[1, 2, 50000]])]),
     ValueError, r"token id 50000 outside the model's vocabulary \[0, 64\)"),
    ("compress-no-layer", "compress", "model without Linear/Conv1D", lambda t: compress(nn.Sequential(nn.Conv2d(2, 2, 1))),
     ValueError, r"no convertible layer in Sequential"),
    ("quantlinear-module-type", "quantize_linear", "unsupported module type",
     lambda t: quantize_linear(nn.Conv2d(2, 2, 1), QuantConfig()), TypeError, r"Conv2d: not an nn.Linear"),
    ("quantlinear-dims", "QuantLinear", "non-positive features", lambda t: QuantLinear(0, 4, WeightFormat()),
     ValueError, r"in_features=0"),
    ("quantlinear-recipe", "QuantLinear", "a recipe where the format goes", lambda t: QuantLinear(8, 4, QuantConfig()),
     TypeError, r"must be a qruntime.formats.packing.WeightFormat \(a QuantConfig's .format\)"),
    ("quantlinear-shape", "QuantLinear.forward", "wrong input width",
     lambda t: quantize_linear(nn.Linear(8, 4), QuantConfig())(torch.randn(2, 5)),
     ValueError, r"shape \(2, 5\), expected \[\.\.\., 8\]"),
    ("quantlinear-int-input", "QuantLinear.forward", "integer input",
     lambda t: quantize_linear(nn.Linear(8, 4), QuantConfig())(torch.ones(2, 8, dtype=torch.long)),
     TypeError, r"torch.int64 is not a floating-point dtype"),
    ("op-weight-dtype", "ops", "wrong weight dtype", lambda t: ops.w8a16_linear(X, Q8[0].to(torch.int16), Q8[1], None),
     TypeError, r"qweight: dtype torch.int16"),
    ("op-x-dims", "ops", "activations not 2-D", lambda t: ops.w8a8_linear(X[None], *Q8, None),
     ValueError, r"x: shape \(1, 3, 32\), expected 2 dims"),
    ("op-k-mismatch", "ops", "K of x and weight differ", lambda t: ops.w8a16_linear(X[:, :31], *Q8, None),
     ValueError, r"K=31, qweight has K=32"),
    ("op-scales-shape", "ops", "scales of the wrong shape", lambda t: ops.w8a8_linear(X, Q8[0], Q8[1][:5], None),
     ValueError, r"scales: shape \(5,\), expected \(8,\)"),
    ("op-bias-shape", "ops", "bias of the wrong shape", lambda t: ops.w8a16_linear(X, *Q8, torch.zeros(7)),
     ValueError, r"bias: shape \(7,\), expected \(8,\)"),
    ("op-group-size", "ops", "group size not dividing the padded K",
     lambda t: ops.w4a16_linear(torch.randn(2, 64), Q4[0], Q4[1], Q4[2], 48, None), ValueError, r"group_size=48"),
    ("op-zeros-dtype", "ops", "zero points of the wrong dtype",
     lambda t: ops.w4a16_linear(torch.randn(2, 64), Q4[0], Q4[1], Q4[2].float(), 32, None), ValueError, r"zeros: dtype torch.float32"),
    ("op-device-mix", "ops (CUDA / Triton)", "tensors on different devices", _device_mix,
     ValueError, r"bias is on meta, x is on cpu"),
    ("op-int-x", "ops", "integer activations", lambda t: ops.w8a16_linear(X.long(), *Q8, None),
     TypeError, r"x: dtype torch.int64"),
    ("save-not-module", "save", "not an nn.Module", lambda t: qruntime.save({"a": 1}, t / "x"),
     TypeError, r"nn.Module"),
    ("save-meta", "save", "model on the meta device", lambda t: qruntime.save(_llama().to("meta"), t / "x"),
     ValueError, r"meta"),
    ("load-missing", "load", "folder without a checkpoint", lambda t: qruntime.load(t),
     CheckpointError, r"qruntime.json"),
    ("load-tampered", "load", "flipped byte in the tensors file", lambda t: qruntime.load(_flip(_saved(t))),
     CheckpointError, r"model.safetensors.*(SHA-256|checksum)"),
    ("export-ragged-groups", "export_compressed_tensors", "K not a multiple of the group size (kernel constraint of the target engines)",
     lambda t: qruntime.export_compressed_tensors(compress(_llama(), "w4a16-g64-rtn", progress=False)[0], t / "ct"),
     ValueError, r"not a multiple of their group size"),
]

# inputs that are valid but unusual: documented results, not errors
FALLBACKS = [
    ("w8a8-nan-row", "ops (W8A8)", "a NaN or Inf in an activation row",
     "every output of that row is NaN (reference, C++ and Triton alike); other rows are unaffected"),
    ("emb-recipe-no-embedding", "compress", "`-emb8`/`-emb4` on a model without an nn.Embedding",
     "nothing packed for it; listed in report.skipped with the reason"),
    ("cli-bad-input", "CLI", "any of the above from the command line",
     "one line `qruntime: error: ...` on stderr; exit code 2 for bad input, 1 otherwise"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_a_clear_error(case, tmp_path):
    _, _, _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        call(tmp_path)


def test_w8a8_nan_row_gives_nan_outputs_on_every_backend():
    x = torch.randn(4, 32)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    results = {"reference": qruntime.ops.reference.w8a8_linear(x, *Q8, None)}
    for isa in ops.supported_cpu_isas():
        with ops.use_cpu_isa(isa):
            results[isa] = ops.cpu_w8a8(x, *Q8, None)
    for name, y in results.items():
        assert y[1:3].isnan().all() and torch.isfinite(y[[0, 3]]).all(), name
        torch.testing.assert_close(y[[0, 3]], results["reference"][[0, 3]], rtol=1e-5, atol=1e-5)


def test_embedding_recipe_without_embedding_is_reported():
    _, report = compress(nn.Sequential(nn.Linear(8, 8)), "w8a16-emb8", progress=False)
    assert any("not an nn.Embedding" in s.reason for s in report.skipped)


def test_cli_errors_are_one_line(capsys):
    assert _cli("compress", "x", "--recipe", "w5a16", "--out", "o") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qruntime: error:") and "w5a16" in err[0]


def test_the_documented_matrix_matches_the_tests():
    doc = (Path(__file__).parents[1] / "docs" / "robustness.md").read_text()
    ids = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M))
    assert ids == {c[0] for c in CASES} | {f[0] for f in FALLBACKS}
