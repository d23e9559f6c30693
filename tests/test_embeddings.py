"""QuantEmbedding and the "-emb8" / "-emb4" recipes: the token table (and a head tied to it) packed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qruntime
from qruntime.quant.config import QuantConfig
from qruntime.recipes.presets import resolve_config
from qruntime.nn.modules import QuantEmbedding, QuantLinear


@pytest.mark.parametrize(
    "quant", [QuantConfig(8), QuantConfig(4, 32, False), QuantConfig(4, None, True), QuantConfig(4, 16, True)],
    ids=lambda q: q.name,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lookup_equals_dequantized_rows(quant, dtype):
    emb = nn.Embedding(50, 40, padding_idx=0).to(dtype)
    q = QuantEmbedding.from_embedding(emb, quant.format)
    ids = torch.randint(0, 50, (3, 7))
    out = q(ids)
    assert out.dtype == dtype and out.shape == (3, 7, 40)
    assert torch.equal(out, q.dequantized_weight()[ids].to(dtype))
    ref = emb.weight.detach().double()
    rel = (torch.linalg.vector_norm(q.dequantized_weight().double() - ref) / torch.linalg.vector_norm(ref)).item()
    assert rel < (0.01 if quant.bits == 8 else 0.2)


def test_tied_head_shares_tensors_and_matches_a_float_head():
    q = QuantEmbedding.from_embedding(nn.Embedding(64, 48), QuantConfig(4, 16, False).format)
    head = QuantLinear.tied_to(q)
    assert head.qweight is q.qweight and head.zeros is q.zeros
    x = torch.randn(5, 48)
    ref = x.double() @ q.dequantized_weight().double().t()
    assert (torch.linalg.vector_norm(head(x).double() - ref) / torch.linalg.vector_norm(ref)).item() < 1e-5


def test_bad_inputs():
    q = QuantEmbedding.from_embedding(nn.Embedding(10, 16), QuantConfig(8).format)
    with pytest.raises(TypeError, match="integer"):
        q(torch.zeros(3))
    with pytest.raises(ValueError, match="act_bits"):
        QuantEmbedding(10, 16, QuantConfig(8, act_bits=8).format)
    with pytest.raises(TypeError, match="nn.Embedding"):
        QuantEmbedding.from_embedding(nn.Linear(3, 3), QuantConfig(8).format)
    with pytest.raises(ValueError, match="round-to-nearest"):
        qruntime.CompressConfig(embeddings=QuantConfig(8, method="gptq"))


def test_presets_parse():
    cfg = resolve_config("w4a16-g64-gptq-emb4")
    assert cfg.embeddings == QuantConfig(4, 64, False) and cfg.name == "w4a16-g64-asym-gptq-emb4"
    assert resolve_config("w8a8-emb4").embeddings == QuantConfig(4, 128, False)
    assert resolve_config("w8a16-emb8").embeddings == QuantConfig(8)
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("w8a16-emb2")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_compress_packs_embedding_and_tied_head(arch, request):
    base = request.getfixturevalue(arch)
    q, report = qruntime.compress(base, "w8a16-emb8", inplace=False, progress=False)
    emb, head = q.get_input_embeddings(), q.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear) and head.qweight is emb.qweight
    assert not report.skipped  # lm_head is no longer skipped: it is the tied, packed table
    by_name = {l.name: l for l in report.layers}
    assert by_name["lm_head"].bytes_after == 0 and "tied to" in by_name["lm_head"].method
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref, got = base(ids).logits, q(ids).logits
    assert (torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref)).item() < 0.03
    assert report.model_bytes_after < 0.35 * report.model_bytes_before


def test_untied_and_missing_embeddings_are_reported(tiny_bert):
    q, report = qruntime.compress(tiny_bert, "w8a16-emb8", inplace=False, progress=False)
    assert isinstance(q.get_input_embeddings(), QuantEmbedding)
    assert [s.name for s in report.skipped] == ["classifier"]
    plain = nn.Sequential(nn.Linear(16, 16))
    _, report = qruntime.compress(plain, "w8a16-emb8", inplace=False, progress=False)
    assert report.skipped[-1].kind == "Embedding" and "get_input_embeddings" in report.skipped[-1].reason


def test_a_scaled_word_embedding_keeps_its_factor_through_compress_save_and_load(tmp_path):
    """Gemma's embedding multiplies its rows by sqrt(hidden) in its own forward: the packed embedding
    must keep that factor (losing it once gave logits at 6 dB SQNR, with no error)."""
    import support_matrix as sm

    model = sm.build("gemma")
    emb = model.get_input_embeddings()
    ids = sm.heldout()
    q, report = qruntime.compress(model, "w8a16-emb8", inplace=False, progress=False)
    packed = q.get_input_embeddings()
    assert isinstance(packed, QuantEmbedding) and packed.embed_scale == pytest.approx(64 ** 0.5)
    with torch.no_grad():
        rows = packed(ids)
        assert torch.allclose(rows, packed.dequantized_weight()[ids] * packed.embed_scale)
        assert sm.rel(rows, emb(ids)) < 0.01
    assert sm.sqnr_db(sm.logits(q, ids), sm.logits(model, ids)) >= sm.MIN_SQNR_DB["w8a16"]
    qruntime.save(q, tmp_path / "ckpt")
    loaded = qruntime.load(tmp_path / "ckpt")
    assert loaded.get_input_embeddings().embed_scale == packed.embed_scale
    assert torch.equal(sm.logits(loaded, ids), sm.logits(q, ids))


def test_an_embedding_whose_forward_adds_more_than_a_factor_is_left_with_its_reason(tiny_llama):
    class Shifted(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) + 1.0

    old = tiny_llama.get_input_embeddings()
    shifted = Shifted(old.num_embeddings, old.embedding_dim)
    shifted.weight = old.weight
    tiny_llama.set_input_embeddings(shifted)
    q, report = qruntime.compress(tiny_llama, "w8a16-emb8", inplace=False, progress=False)
    assert type(q.get_input_embeddings()) is Shifted
    reasons = [s.reason for s in report.skipped if "Shifted" in s.reason]
    assert reasons and "not its rows times one factor" in reasons[0]
