"""qruntime.save / qruntime.load: exact round trips, tied tensors, sizes, and every way a checkpoint can be bad."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import qruntime
from qruntime.io.checkpoint import FORMAT_VERSION, MANIFEST, WEIGHTS, CheckpointError, load, read_manifest, save
from qruntime.nn.modules import QuantEmbedding, QuantLinear

ROUND_TRIP_PRESETS = ["w8a16", "w8a8-nosq", "w4a16-g32-rtn", "w4a16-sym-rtn", "w4a16-g16-sym-rtn", "w8a16-emb8",
                      "w4a16-g32-rtn-emb4"]


def _ids(vocab: int = 128, seq: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (2, seq))


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _tensor_bytes(folder) -> int:
    m = read_manifest(folder)
    total = 0
    for meta in m["tensors"].values():
        n = 1
        for d in meta["shape"]:
            n *= d
        total += n * getattr(torch, meta["dtype"]).itemsize
    return total


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("preset", ROUND_TRIP_PRESETS)
def test_round_trip_is_bit_identical(arch, preset, request, tmp_path):
    base = request.getfixturevalue(arch)
    qmodel, report = qruntime.compress(base, preset, inplace=False, progress=False)
    save(qmodel, tmp_path, report=report, base_model="tiny")
    loaded = load(tmp_path)
    assert type(loaded) is type(qmodel) and not loaded.training
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(qmodel, ids))
    for (n1, t1), (n2, t2) in zip(qmodel.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2), n1
    # no pickle: only safetensors, JSON and tokenizer/config text files
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".bin", ".pt", ".pth", ".pkl"))]
    # the file is exactly the tensors plus safetensors' JSON header (the 1.05x bound on real models is
    # checked in test_real_models.py; on these tiny ones the header is a visible share)
    with open(tmp_path / WEIGHTS, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    assert os.path.getsize(tmp_path / WEIGHTS) == 8 + header + _tensor_bytes(tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["recipe"] == report.config and manifest["base_model"] == "tiny"
    assert set(manifest["modules"]) == {n for n, m in qmodel.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def test_tied_weights_stay_tied(tiny_llama, tiny_gpt2, tmp_path):
    for i, base in enumerate((tiny_llama, tiny_gpt2)):
        q, _ = qruntime.compress(base, "w8a16", inplace=False, progress=False)
        save(q, tmp_path / f"f{i}")
        r = load(tmp_path / f"f{i}")
        assert r.lm_head.weight is r.get_input_embeddings().weight  # one Parameter, stored once
        assert "lm_head.weight" in read_manifest(tmp_path / f"f{i}")["tied"]
        q, _ = qruntime.compress(base, "w4a16-g32-rtn-emb4", inplace=False, progress=False)
        save(q, tmp_path / f"e{i}")
        r = load(tmp_path / f"e{i}")
        emb, head = r.get_input_embeddings(), r.lm_head
        assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
        assert head.qweight is emb.qweight and head.scales is emb.scales


def test_bf16_model_round_trip(tiny_llama, tmp_path):
    base = tiny_llama.to(torch.bfloat16)
    q, _ = qruntime.compress(base, "w4a16-g32-rtn", inplace=False, progress=False)
    save(q, tmp_path)
    r = load(tmp_path)
    assert r.model.norm.weight.dtype == torch.bfloat16
    ids = _ids()
    assert torch.equal(_logits(r, ids), _logits(q, ids))


def test_gptq_model_round_trip_and_report_kept(tiny_llama, tmp_path):
    calib = [torch.randint(0, 128, (1, 32)) for _ in range(4)]
    q, report = qruntime.compress(tiny_llama, "w4a16-g32-gptq", calib, inplace=False, progress=False)
    assert report.stages.keys() == {"calibration + quantization (block by block)", "quantization"}
    assert all(l.output_rel_error is not None and 0 < l.output_rel_error < 1 for l in report.layers)
    save(q, tmp_path, report=report)
    ids = _ids()
    assert torch.equal(_logits(load(tmp_path), ids), _logits(q, ids))
    back = qruntime.CompressReport.from_dict(read_manifest(tmp_path)["report"])
    assert back.to_dict() == report.to_dict()


def test_plain_module_needs_its_architecture(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 48), nn.GELU(), nn.Linear(48, 24)).eval()
    q, _ = qruntime.compress(base, "w4a16-g16-rtn", inplace=False, progress=False)
    save(q, tmp_path)
    with pytest.raises(CheckpointError, match="pass the architecture"):
        load(tmp_path)
    fresh = nn.Sequential(nn.Linear(40, 48), nn.GELU(), nn.Linear(48, 24))
    r = load(tmp_path, model=fresh)
    x = torch.randn(3, 40)
    assert torch.equal(r(x), q(x))
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path, model=nn.Sequential(nn.Linear(40, 48)))


@pytest.fixture
def saved(tiny_llama, tmp_path):
    q, report = qruntime.compress(tiny_llama, "w4a16-g32-rtn", inplace=False, progress=False)
    save(q, tmp_path, report=report)
    return tmp_path


def _edit_manifest(folder, fn):
    m = json.loads((folder / MANIFEST).read_text())
    fn(m)
    (folder / MANIFEST).write_text(json.dumps(m))


def test_a_manifest_with_the_recipe_fields_still_loads(saved):
    """Files written before modules knew only their format hold the whole recipe (QuantConfig) per
    module: the recipe's fields are ignored, and the model loads bit for bit."""
    ids = _ids()
    expected = _logits(load(saved), ids)
    recipe = {"method": "gptq", "gptq_damp": 0.01, "gptq_block_size": 128, "gptq_act_order": True, "clip": "none",
              "sequential": True, "tune_steps": 0, "tune_lr": 0.002, "tune_rounding": False}

    def old_style(m):
        for entry in m["modules"].values():
            assert set(entry["quant"]) == {"bits", "group_size", "symmetric", "act_bits"}
            entry["quant"].update(recipe)
    _edit_manifest(saved, old_style)
    loaded = load(saved)
    assert torch.equal(_logits(loaded, ids), expected)
    assert all(m.weight_format == qruntime.WeightFormat(4, 32, False) for m in loaded.modules()
               if isinstance(m, QuantLinear))


def test_flipped_byte_is_detected(saved):
    path = saved / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load(saved)


def test_truncated_file_is_detected(saved):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(saved)
    # without the checksum pass, safetensors' own header check still refuses it
    with pytest.raises(CheckpointError):
        load(saved, verify=False)


def test_missing_and_foreign_files(saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(CheckpointError, match="no qruntime.json"):
        load(empty)
    with pytest.raises(CheckpointError, match="not a folder"):
        load(empty / "nope")
    (saved / WEIGHTS).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load(saved)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(format_version=FORMAT_VERSION + 1), "format_version"),
        (lambda m: m.update(format="something-else"), "format="),
        (lambda m: m.pop("modules"), "missing fields"),
        (lambda m: m["files"].update({"../x.safetensors": {"bytes": 1, "sha256": "0"}}), "plain file name"),
        (lambda m: m["tensors"]["model.norm.weight"].update(dtype="float16"), "manifest says"),
        (lambda m: next(iter(m["modules"].values()))["quant"].update(bits=3), "invalid entry"),
        (lambda m: next(iter(m["modules"].values())).update(type="Pickled"), "not known"),
        (lambda m: next(iter(m["modules"].values())).update(in_features=95), "do not fit"),
        (lambda m: m.update(model_module="evil.module"), "pass the architecture"),
    ],
)
def test_bad_manifest_gives_clear_error(saved, edit, match):
    _edit_manifest(saved, edit)
    with pytest.raises(CheckpointError, match=match):
        load(saved)


def test_not_json(saved):
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(saved)


def test_tampered_values_are_refused(tiny_llama, tmp_path):
    q, _ = qruntime.compress(tiny_llama, "w4a16-g32-rtn", inplace=False, progress=False)
    name, layer = next((n, m) for n, m in q.named_modules() if isinstance(m, QuantLinear))
    layer.scales[0, 0] = float("nan")
    save(q, tmp_path)  # the checksums match what was written: the values themselves are checked on load
    with pytest.raises(CheckpointError, match=f"{name}.*finite"):
        load(tmp_path)


def test_save_refuses_meta_and_non_modules(tmp_path):
    with pytest.raises(TypeError, match="nn.Module"):
        save({"a": torch.zeros(1)}, tmp_path)
    with torch.device("meta"):
        m = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="meta device"):
        save(m, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_checkpoint_moves_between_devices(tiny_llama, tmp_path):
    q, _ = qruntime.compress(tiny_llama, "w4a16-g32-rtn", inplace=False, progress=False)
    save(q, tmp_path / "cpu")
    on_gpu = load(tmp_path / "cpu", device="cuda")
    ids = _ids()
    assert next(on_gpu.parameters()).device.type == "cuda"
    torch.testing.assert_close(_logits(on_gpu, ids.cuda()).cpu(), _logits(q, ids), rtol=1e-3, atol=1e-3)
    save(on_gpu, tmp_path / "gpu")
    back = load(tmp_path / "gpu")
    assert torch.equal(_logits(back, ids), _logits(q, ids))
