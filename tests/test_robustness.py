"""Guarantees of compress(): a failure anywhere leaves the caller's model exactly as it was, hooks are
removed, and the same model + recipe + data give bit-identical weights (with the data's fingerprint in
the report)."""
from __future__ import annotations

import copy

import pytest
import torch

import qruntime
from qruntime import QuantLinear, compress
from qruntime.recipes.presets import resolve_config
from qruntime.nn.modules import QuantEmbedding


def _snapshot(model):
    return {
        "types": [(name, type(m)) for name, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after["types"] == before["types"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
    assert after["hooks"] == before["hooks"]


def _calib(n=3):
    torch.manual_seed(1)
    return [torch.randint(0, 128, (1, 12)) for _ in range(n)]


@pytest.mark.parametrize("fail_at", [1, 3, 7])
@pytest.mark.parametrize("preset", ["w8a16", "w4a16-g32-gptq"])
def test_failure_in_the_nth_layer_leaves_the_model_as_it_was(tiny_llama, monkeypatch, preset, fail_at):
    before = _snapshot(tiny_llama)
    import qruntime.pipeline.compress as pipeline

    original = pipeline.quantize_linear
    calls = {"n": 0}

    def failing(module, quant, hessian=None):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise RuntimeError(f"injected failure in layer {fail_at}")
        return original(module, quant, hessian=hessian)

    monkeypatch.setattr(pipeline, "quantize_linear", failing)
    with pytest.raises(RuntimeError, match=f"injected failure in layer {fail_at}"):
        compress(tiny_llama, preset, _calib(), progress=False)
    _assert_unchanged(tiny_llama, before)


def test_failure_during_calibration_removes_hooks_and_changes_nothing(tiny_llama):
    before = _snapshot(tiny_llama)

    def batches():
        yield torch.randint(0, 128, (1, 8))
        raise OSError("injected: the data source broke after one batch")

    with pytest.raises(OSError, match="after one batch"):
        compress(tiny_llama, "w4a16-g32-gptq", batches(), progress=False)
    _assert_unchanged(tiny_llama, before)


def test_failure_in_the_embedding_leaves_the_model_as_it_was(tiny_llama, monkeypatch):
    before = _snapshot(tiny_llama)

    def failing(cls, module, quant):
        raise MemoryError("injected while packing the embedding")

    monkeypatch.setattr(QuantEmbedding, "from_embedding", classmethod(failing))
    with pytest.raises(MemoryError, match="injected"):
        compress(tiny_llama, "w4a16-g32-rtn-emb4", progress=False)
    _assert_unchanged(tiny_llama, before)


def test_inplace_false_never_touches_the_original_even_on_success(tiny_llama):
    before = _snapshot(tiny_llama)
    q, _ = compress(tiny_llama, "w4a16-g32-gptq-emb4", _calib(), inplace=False, progress=False)
    assert q is not tiny_llama and isinstance(q.model.layers[0].mlp.up_proj, QuantLinear)
    _assert_unchanged(tiny_llama, before)


@pytest.mark.parametrize("preset", ["w8a16", "w4a16-g32-asym-rtn", "w8a8-nosq", "w8a8", "w4a16-g32-gptq", "w8a16-gptq-emb8"])
def test_same_model_recipe_and_data_give_bit_identical_weights(tiny_llama, preset):
    runs = []
    for _ in range(2):
        q, report = compress(copy.deepcopy(tiny_llama), preset, _calib(), progress=False)
        runs.append((q.state_dict(), report))
    (a, ra), (b, rb) = runs
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ra.calibration == rb.calibration
    if resolve_config(preset).needs_calibration:  # GPTQ, SmoothQuant (plain w8a8)
        assert ra.calibration["batches"] == 3 and ra.calibration["tokens"] == 36
        assert len(ra.calibration["sha256"]) == 64 and "calibration data: 3 batches" in ra.table()
    else:
        assert ra.calibration == {}  # round-to-nearest reads no data


def test_the_fingerprint_tells_calibration_sets_apart(tiny_llama):
    _, r1 = compress(copy.deepcopy(tiny_llama), "w4a16-g32-gptq", _calib(), progress=False)
    other = _calib()
    other[2] = other[2].clone()
    other[2][0, 5] = (other[2][0, 5] + 1) % 128  # one token differs
    _, r2 = compress(copy.deepcopy(tiny_llama), "w4a16-g32-gptq", other, progress=False)
    dicts = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in _calib()]
    _, r3 = compress(copy.deepcopy(tiny_llama), "w4a16-g32-gptq", dicts, progress=False)
    assert len({r1.calibration["sha256"], r2.calibration["sha256"], r3.calibration["sha256"]}) == 3
    assert r3.calibration["tokens"] == 36


def test_report_with_calibration_round_trips_through_a_checkpoint(tiny_llama, tmp_path):
    q, report = compress(tiny_llama, "w4a16-g32-gptq", _calib(), progress=False)
    qruntime.save(q, tmp_path / "ckpt", report=report)
    manifest = qruntime.io.checkpoint.read_manifest(tmp_path / "ckpt")
    assert qruntime.CompressReport.from_dict(manifest["report"]).calibration == report.calibration
