"""compressed-tensors export: checked by decompressing with the compressed-tensors package itself and by
loading the export with transformers; the decompressed weights must equal ours exactly."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from conftest import require_module

import qruntime
from qruntime.io.export import _pack_int32, export_compressed_tensors
from qruntime.nn.modules import QuantLinear

ct = require_module("compressed_tensors", "compressed-tensors (the test extra) is not installed",
                    allowed="it needs Python >= 3.11" if sys.version_info < (3, 11) else None)


def _ct_decompressed(folder) -> dict[str, torch.Tensor]:
    """Every quantized Linear's weight as the compressed-tensors package decompresses it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_name
    from safetensors.torch import load_file

    qc = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(folder / "model.safetensors"))
    out = {}
    for m in sorted({k.rpartition(".")[0] for k in tensors if k.endswith(".weight_scale")}):
        scheme = next(s for s in qc.config_groups.values() if "Linear" in s.targets or any(match_name(m, t) for t in s.targets))
        comp = BaseCompressor.get_value_from_registry(scheme.format or qc.format)
        out[m] = comp.decompress({p: tensors[f"{m}.{p}"] for p in comp.compression_param_names(scheme)}, scheme)["weight"]
    return out


def test_pack_int32_matches_the_published_bit_order():
    # signed INT4 [-8, -7, -1, 0, 1, 2, 6, 7] stored as q + 8, column 0 in the lowest nibble: 0xfea98710
    codes = torch.tensor([[0, 1, 7, 8, 9, 10, 14, 15]], dtype=torch.uint8)
    assert _pack_int32(codes, 4).item() == 0xFEA98710 - 2**32
    # INT8 [-128, -1, 0, 127] stored as q + 128: 0xff807f00
    assert _pack_int32(torch.tensor([[0, 127, 128, 255]], dtype=torch.uint8), 8).item() == 0xFF807F00 - 2**32
    # ragged columns are padded with code 0
    assert _pack_int32(torch.tensor([[1, 2, 3]], dtype=torch.uint8), 4).item() == 0x321


@pytest.mark.parametrize("preset", ["w8a8-nosq", "w8a16", "w4a16-g32-rtn", "w4a16-g16-sym-rtn", "w4a16-rtn", "w4a16-sym-rtn",
                                    "w4a16-g32-rtn-emb4"])
def test_export_decompresses_to_our_weights_exactly(tiny_llama, preset, tmp_path):
    q, _ = qruntime.compress(tiny_llama, preset, inplace=False, progress=False)
    summary = export_compressed_tensors(q, tmp_path)
    got = _ct_decompressed(tmp_path)
    ours = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear) and n != "lm_head"}
    assert set(got) == set(ours)
    for name, module in ours.items():
        assert torch.equal(got[name], module.dequantized_weight()), name
    assert summary["ignore"] == ["lm_head"]
    assert summary["embeddings_as_float"] == (["model.embed_tokens"] if preset.endswith("emb4") else [])


@pytest.mark.parametrize("preset", ["w8a16", "w4a16-g32-rtn"])
def test_transformers_loads_the_export(tiny_llama, preset, tmp_path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    q, _ = qruntime.compress(tiny_llama, preset, inplace=False, progress=False)
    export_compressed_tensors(q, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref, got = q(ids).logits, hf(ids).logits
    # the same weights; only the summation order of the matmuls differs
    assert (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item() < 1e-5


def test_bert_exports(tiny_bert, tmp_path):
    q, _ = qruntime.compress(tiny_bert, "w4a16-g32-asym-rtn", inplace=False, progress=False)
    summary = export_compressed_tensors(q, tmp_path)
    assert summary["ignore"] == ["classifier"]
    got = _ct_decompressed(tmp_path)
    assert len(got) == 2 * 6 + 1 and all(torch.equal(got[n], q.get_submodule(n).dequantized_weight()) for n in got)


def test_unexportable_models_are_refused_with_reasons(tiny_llama, tiny_gpt2, tmp_path):
    q, _ = qruntime.compress(tiny_llama, "w4a16-g64-rtn", inplace=False, progress=False)  # K=96, 160: not whole groups
    with pytest.raises(ValueError, match=r"K=96, group_size=64.*group size 32"):
        export_compressed_tensors(q, tmp_path)
    q, _ = qruntime.compress(tiny_gpt2, "w8a16", inplace=False, progress=False)
    with pytest.raises(ValueError, match="Conv1D"):
        export_compressed_tensors(q, tmp_path)
    with pytest.raises(ValueError, match="no quantized Linear"):
        export_compressed_tensors(tiny_llama, tmp_path)
    plain, _ = qruntime.compress(nn.Sequential(nn.Linear(32, 32)), "w8a16", inplace=False, progress=False)
    with pytest.raises(ValueError, match="not a transformers model"):
        export_compressed_tensors(plain, tmp_path)


@pytest.mark.parametrize("preset", ["2:4-magnitude+w8a16", "2:4-magnitude+w4a16-g32-rtn", "2:4-magnitude+w4a16-sym-rtn"])
def test_2_4_layers_export_dense_with_their_structure(tiny_llama, preset, tmp_path):
    """2:4 layers are written as dense codes (pruned positions: code 0 / the zero point) that decompress
    to our weights exactly, with a sparsity_config naming them; transformers loads the export."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qruntime.nn.modules import SparseLinear

    q, _ = qruntime.compress(tiny_llama, preset, inplace=False, progress=False)
    export_compressed_tensors(q, tmp_path)
    got = _ct_decompressed(tmp_path)
    ours = {n: m for n, m in q.named_modules() if isinstance(m, SparseLinear)}
    assert set(got) == set(ours)
    for name, module in ours.items():
        assert torch.equal(got[name], module.dequantized_weight()), name
    sc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sc["format"] == "dense" and sc["sparsity_structure"] == "2:4" and sc["targets"] == sorted(ours)
    assert sc["global_sparsity"] >= 0.5
    from compressed_tensors.config import SparsityCompressionConfig

    SparsityCompressionConfig.load_from_registry("dense", **{k: v for k, v in sc.items() if k != "format"})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref, out = q(ids).logits, hf(ids).logits
    assert (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item() < 1e-5


def test_float_2_4_alone_is_refused_with_the_reason(tiny_llama, tmp_path):
    q, _ = qruntime.compress(tiny_llama, "2:4-magnitude", inplace=False, progress=False)
    with pytest.raises(ValueError, match="only float 2:4 layers"):
        export_compressed_tensors(q, tmp_path)
