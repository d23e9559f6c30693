"""Mixture-of-experts models (issue 33): ``transformers`` keeps the experts as fused 3-D parameters and the
router as a bare [num_experts, hidden] parameter, neither an nn.Linear. compress() leaves them in float;
the report must list each with its reason and bytes and count them in its byte totals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qruntime
from qruntime.io.checkpoint import read_manifest
from qruntime.nn.modules import QuantLinear

from conftest import require

# tiny configs, built offline; each family's own name for the expert count and size
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
}
VOCAB = 128


def _tiny_moe(family: str) -> nn.Module:
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    require(family in CONFIG_MAPPING, f"transformers {transformers.__version__} has no {family!r} model",
            allowed="this transformers release predates the family")
    cfg = AutoConfig.for_model(family, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                               bos_token_id=1, eos_token_id=2, pad_token_id=0, **FAMILIES[family])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _weight_tensors(model: nn.Module) -> list[tuple[str, str, nn.Module, torch.Tensor]]:
    """(module name, parameter name, module, tensor) of every Linear weight and every other parameter
    with two or more dims > 1 outside embedding tables, each tensor once: what the report accounts for."""
    seen, out = set(), []
    for mname, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            continue
        for pname, p in module.named_parameters(recurse=False):
            linear = isinstance(module, nn.Linear) and pname == "weight"
            if (linear or sum(d > 1 for d in p.shape) >= 2) and id(p) not in seen:
                seen.add(id(p))
                out.append((mname, pname, module, p))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _packed_bytes(module: nn.Module) -> int:
    """A converted layer's stored weight: every tensor it holds but the bias."""
    return sum(_nbytes(t) for n, t in list(module.named_buffers()) + list(module.named_parameters()) if n != "bias")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_weight_is_converted_or_skipped_with_its_bytes(family):
    base = _tiny_moe(family)
    weights = _weight_tensors(base)
    fused = [(m, p, t) for m, p, _, t in weights if t.dim() == 3]
    assert fused, f"{family}: no fused 3-D expert tensor; this transformers keeps experts as another layout"
    q, report = qruntime.compress(base, "w8a16", inplace=False, progress=False)
    converted = {l.name for l in report.layers}
    skipped = {s.name: s for s in report.skipped}
    assert not converted & skipped.keys() and all(s.reason for s in report.skipped)
    float_bytes = 0
    for mname, pname, module, t in weights:
        if mname in converted:
            assert isinstance(module, nn.Linear) and isinstance(q.get_submodule(mname), QuantLinear)
            continue
        entry = skipped.get(mname if isinstance(module, nn.Linear) else f"{mname}.{pname}")
        assert entry is not None, f"{mname}.{pname} {tuple(t.shape)} neither converted nor skipped"
        assert (entry.nbytes, entry.shape, entry.dtype) == (_nbytes(t), list(t.shape), "float32")
        float_bytes += _nbytes(t)
    for mname, pname, t in fused:
        entry = skipped[f"{mname}.{pname}"]
        assert "fused 3-D expert weights (4 experts" in entry.reason and "not quantized" in entry.reason
    routers = [s for s in report.skipped if "router" in s.reason]
    assert [s.name for s in routers] == [f"model.layers.{i}.mlp.gate.weight" for i in range(2)]
    # the totals, computed here from the models' tensors
    expert_bytes = sum(_nbytes(t) for _, _, t in fused)
    converted_before = sum(_nbytes(t) for m, _, _, t in weights if m in converted)
    converted_after = sum(_packed_bytes(q.get_submodule(name)) for name in converted)
    assert report.skipped_bytes == float_bytes >= expert_bytes
    assert report.total_weight_bytes_before == converted_before + float_bytes == sum(_nbytes(t) for *_, t in weights)
    assert report.total_weight_bytes_after == converted_after + float_bytes
    assert report.total_compression == pytest.approx((converted_before + float_bytes) / (converted_after + float_bytes))
    assert report.model_bytes_before == sum(_nbytes(t) for t in list(base.parameters()) + list(base.buffers()))
    d = report.to_dict()
    assert d["skipped_bytes"] == float_bytes and d["total_weight_bytes_after"] == converted_after + float_bytes
    text = report.table(max_layers=None)
    line = next(l for l in text.splitlines() if l.startswith(f"skipped {fused[0][0]}.{fused[0][1]} "))
    shape = "x".join(map(str, fused[0][2].shape))
    assert f"{shape} float32, {_nbytes(fused[0][2]) / 1024:.1f} KiB): fused 3-D expert weights" in line
    assert "not converted (left as they are)" in text and f"({report.total_compression:.2f}x)" in text


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compressed_moe_runs_generates_and_round_trips(family, tmp_path):
    base = _tiny_moe(family)
    ids = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        ref = base(ids).logits
    q, report = qruntime.compress(base, "w8a16", inplace=False, progress=False)
    with torch.no_grad():
        out = q(ids).logits
    sqnr = 20 * torch.log10(torch.linalg.vector_norm(ref) / torch.linalg.vector_norm(out - ref)).item()
    assert out.shape == ref.shape and sqnr > 30
    generated = q.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (2, 16) and torch.equal(generated[:, :12], ids)

    qruntime.save(q, tmp_path, report=report)
    loaded = qruntime.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, out)
    assert torch.equal(loaded.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False), generated)
    back = qruntime.CompressReport.from_dict(read_manifest(tmp_path)["report"])
    assert back.skipped == report.skipped and back.total_weight_bytes_after == report.total_weight_bytes_after


def test_report_from_before_skipped_bytes_loads():
    old = {"config": "w8a16", "skipped": [{"name": "lm_head", "kind": "Linear", "reason": "matches exclude pattern"}]}
    report = qruntime.CompressReport.from_dict(old)
    assert report.skipped[0].nbytes == 0 and report.skipped_bytes == 0
    assert "skipped lm_head (Linear): matches exclude pattern" in report.table()


def test_shared_and_non_linear_weights_are_counted_once():
    shared = nn.Linear(16, 16, bias=False)
    twin = nn.Linear(16, 16, bias=False)
    twin.weight = shared.weight
    attention = nn.MultiheadAttention(16, 2)  # in_proj_weight: a bare [48, 16] parameter
    model = nn.ModuleDict({"body": nn.Linear(16, 16), "head": shared, "head2": twin, "attn": attention,
                           "conv": nn.Conv2d(16, 8, 1), "norm": nn.LayerNorm(16)})
    cfg = qruntime.CompressConfig(quant=qruntime.QuantConfig(bits=8), exclude=("head*",))
    _, report = qruntime.compress(model, cfg, progress=False)
    skipped = {s.name: s for s in report.skipped}
    assert set(skipped) == {"head", "head2", "attn.in_proj_weight", "conv.weight"}
    assert skipped["head"].nbytes == 16 * 16 * 4 and skipped["head2"].nbytes == 0
    assert "the tensor of head, counted there" in skipped["head2"].reason
    assert "2-D parameter of MultiheadAttention" in skipped["attn.in_proj_weight"].reason
    assert skipped["conv.weight"].shape == [8, 16, 1, 1] and skipped["conv.weight"].kind == "Conv2d"
    assert report.skipped_bytes == (16 * 16 + 48 * 16 + 8 * 16) * 4
    assert {l.name for l in report.layers} == {"body", "attn.out_proj"}


def test_no_linear_target_error_names_the_other_weights():
    experts = nn.Module()
    experts.num_experts = 4
    experts.gate_up_proj = nn.Parameter(torch.randn(4, 32, 16))
    with pytest.raises(ValueError, match=r"found 0 Linear/Conv1D layers.*1 other weight tensors \(e\.g\. experts\.gate_up_proj\)"):
        qruntime.compress(nn.ModuleDict({"experts": experts}), "w8a16", progress=False)
