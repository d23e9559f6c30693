"""The qruntime command line on a tiny local model (offline, seconds): compress -> info -> eval -> bench
-> export, --json output, and one-line errors with non-zero exit codes."""
from __future__ import annotations

import json

import pytest
import torch

from qruntime.cli import main
from qruntime.recipes.presets import parse_preset


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a word-level tokenizer, saved like any HF model folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from qruntime.eval.data import split_text

    words = split_text("calibration")[:20000].split()
    vocab = {"[UNK]": 0}
    for w in words:
        if len(vocab) < 256 and w not in vocab:
            vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path_factory.mktemp("tiny-llama")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compress_info_eval_bench_export(tiny_folder, tmp_path, capsys):
    out_dir = tmp_path / "ckpt"
    code, out, err = _run(capsys, "compress", tiny_folder, "--recipe", "w4a16-g32-gptq", "--calib-samples", "2",
                          "--seq-len", "32", "--out", out_dir, "--quiet", "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)  # stdout is only JSON with --json
    assert result["report"]["config"] == "w4a16-g32-asym-gptq" and result["bytes_on_disk"] > 0
    assert result["report"]["calibration"]["device"] == "cpu"  # onloaded (qruntime.plumbing.offload)
    assert "saved" in err and "calibration" in err  # the human report went to stderr

    code, out, err = _run(capsys, "info", out_dir, "--verify")
    assert code == 0, err
    assert "checksums: OK" in out and "14 w4a16-g32-asym" in out  # the modules' format (the recipe is in the report)

    code, out, err = _run(capsys, "eval", out_dir, "--eval-tokens", "300", "--window", "64", "--quiet", "--json")
    assert code == 0, err
    ev = json.loads(out)["causal_lm"]
    assert ev["perplexity"] > 1 and ev["reference_perplexity"] > 1 and 0 <= ev["top1_agreement"] <= 1
    assert json.loads(out)["reference"] == str(tiny_folder)  # the base model the checkpoint records

    code, out, err = _run(capsys, "bench", out_dir, "--prefill", "16", "--prompt", "8", "--decode", "2", "--rounds", "1", "--json")
    assert code == 0, err
    res = json.loads(out)["results"]
    assert set(res) == {str(out_dir), str(tiny_folder)} and all(r["decode_tok_s"] > 0 for r in res.values())
    assert all(r["path"] == "qruntime decoder" for r in res.values())  # a Llama: the decoder runs both
    code, out, err = _run(capsys, "bench", out_dir, "--prefill", "16", "--prompt", "8", "--decode", "2", "--rounds", "1",
                          "--decoder", "hf")
    assert code == 0, err
    assert out.count("[HF forward]") == 2 and "[qruntime decoder]" not in out

    code, out, err = _run(capsys, "export", out_dir, "--out", tmp_path / "ct")
    assert code == 0, err
    assert json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["quant_method"] == "compressed-tensors"


def test_presets_and_json_file(tmp_path, capsys):
    code, out, _ = _run(capsys, "presets", "--json", tmp_path / "p.json")
    assert code == 0 and "w4a16-g128" in out
    assert "w8a8" in json.loads((tmp_path / "p.json").read_text())["presets"]


@pytest.mark.parametrize(
    "argv, match, code",
    [
        (["compress", "x", "--recipe", "w3a16", "--out", "o"], "unknown preset 'w3a16'", 2),
        (["info", "/nonexistent/ckpt"], "not a folder", 2),
        (["eval", "{tmp}", "--eval-tokens", "0"], "--eval-tokens=0: must be >= 1", 2),
        (["info", "{tmp}"], "no qruntime.json", 2),
    ],
)
def test_errors_are_one_line_with_exit_code(argv, match, code, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc, out, err = _run(capsys, *argv)
    assert rc == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qruntime: error: ") and match in lines[0], err


def test_eval_of_encoder_rejects_ppl_and_scores_embeddings(tiny_folder, tmp_path, capsys):
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=256, max_position_embeddings=64)).save_pretrained(tmp_path / "bert")
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_folder)
    tok.pad_token = tok.unk_token  # sentences are padded into batches
    tok.save_pretrained(tmp_path / "bert")
    rc, out, err = _run(capsys, "eval", tmp_path / "bert", "--ppl")
    assert rc == 2 and "perplexity needs a causal LM" in err
    rc, out, err = _run(capsys, "eval", tiny_folder, "--tasks")
    assert rc == 2 and "--tasks: scores sentence embeddings; " in err and "is a causal LM, not an encoder" in err
    # without --ppl: movie-review probe and, against a reference (itself here), cosine and the refit probe
    rc, out, err = _run(capsys, "eval", tmp_path / "bert", "--reference", tmp_path / "bert")
    assert rc == 0, err
    assert "(the reference's probe)" in out and "refit on its own embeddings" in out
    assert "embedding cosine to the reference: mean 1.00000" in out
    assert "cross-validated probe accuracy:" in out and "(the reference's probes; +0.00 +- 0.00 points)" in out
    # --tasks: the three further uses of the embeddings, on the real data, in the text and the JSON
    rc, out, err = _run(capsys, "eval", tmp_path / "bert", "--reference", tmp_path / "bert", "--tasks", "--json")
    assert rc == 0, err
    tasks = json.loads(out)["encoder_tasks"]
    assert tasks["sentiment"]["sentences"] == 4000 and tasks["newsgroups"]["posts"] == 200
    assert tasks["sentiment"]["model"] == tasks["sentiment"]["reference"] and tasks["lee"]["pairs"] == 1225
    assert tasks["max_length"] == 64  # the tiny BERT's positions, not the default 256
    assert "cross-validated probe accuracy on 4000 movie-review sentences (sentiment):" in err
    assert "Lee news similarity (1225 rated pairs): Pearson" in err and "(Pearson +0.000 +- 0.000)" in err


def test_demo_takes_json_and_quiet_like_every_command(tiny_folder, tmp_path, capsys):
    # --json without a file: the JSON alone on stdout, the table on stderr; --quiet: no progress bars
    code, out, err = _run(capsys, "demo", "--model", tiny_folder, "--preset", "w8a16", "--eval-tokens", "128",
                          "--window", "32", "--json", "--quiet")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["report"]["config"] == "w8a16" and summary["eval"]["tokens_scored"] == 128 - 4
    assert "Linear weight bytes" in err and "perplexity x" in err
    # what it gained in speed: both models timed side by side, 3 rounds by default
    for name in ("original", "compressed"):
        assert len(summary["speed"][name]["decode_tok_s_all"]) == 3 and summary["speed"][name]["prefill_tok_s"] > 0
    assert "prefill tokens/s (32 tokens)" in err and "decode tokens/s" in err and "x the original's speed" in err
    # the original as a user ran it (its own forward), the compressed model on qruntime's decoder
    assert summary["speed"]["original"]["path"] == "HF forward"
    assert summary["speed"]["compressed"]["path"] == "qruntime decoder" and "qruntime decoder" in err
    assert "it/s" not in err and "%|" not in err  # no tqdm bar, transformers' weight loading included
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()  # turned back on after the command
    # --json FILE: the table on stdout, the file written
    code, out, err = _run(capsys, "demo", "--model", tiny_folder, "--preset", "w8a16", "--eval-tokens", "128",
                          "--window", "32", "--json", tmp_path / "demo.json", "--quiet", "--speed-rounds", "0")
    assert code == 0 and "Linear weight bytes" in out and f"wrote {tmp_path / 'demo.json'}" in err
    assert "decode tokens/s" not in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["report"]["config"] == "w8a16" and saved["speed"] is None
    code, out, err = _run(capsys, "demo", "--model", tiny_folder, "--speed-rounds", "-1")
    assert code == 2 and "--speed-rounds=-1: must be >= 0" in err


@pytest.mark.parametrize("hub_off", [False, True])
def test_quiet_leaves_each_librarys_bars_as_they_were(hub_off):
    from huggingface_hub import utils as hub
    from transformers.utils import logging as hf_logging

    from qruntime.cli import _library_bars_off

    (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()
    try:
        with _library_bars_off():
            assert not hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        assert hf_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled() == hub_off
    finally:
        hub.enable_progress_bars()


@pytest.mark.filterwarnings("error::FutureWarning")  # the KV cache passed under its current name
def test_demo_timing_stays_within_the_models_positions(tiny_folder, tmp_path, capsys):
    # a GPT-2 with 64 positions, evaluated in windows of 64: the timing's prefill and prompt + decode fit too
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256, n_positions=64)).save_pretrained(tmp_path / "gpt2")
    PreTrainedTokenizerFast.from_pretrained(tiny_folder).save_pretrained(tmp_path / "gpt2")
    code, out, err = _run(capsys, "demo", "--model", tmp_path / "gpt2", "--preset", "w8a16", "--eval-tokens", "256",
                          "--window", "64", "--speed-rounds", "1", "--quiet")
    assert code == 0, err
    assert "prefill tokens/s (64 tokens)" in out and "decode tokens/s" in out


def test_compress_with_depth_stage(tiny_folder, tmp_path, capsys):
    """d1+w8a16: a 1-block student distilled on the training split, quantized, saved, reloaded."""
    import qruntime

    out_dir = tmp_path / "ckpt"
    code, out, err = _run(capsys, "compress", tiny_folder, "--recipe", "d1+w8a16", "--train-samples", "8",
                          "--train-seq-len", "16", "--distill-steps", "2", "--out", out_dir, "--quiet", "--json")
    assert code == 0, err
    report = json.loads(out)["report"]
    assert report["config"] == "d1+w8a16" and report["distillation"]["student_layers"] == 1
    assert report["distillation"]["steps"] == 2 and report["distillation"]["tokens"] == 2 * 4 * 16
    assert "distillation: 2 -> 1 blocks" in err and "held-out perplexity: teacher" in err
    model = qruntime.load(out_dir)
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1


def test_compress_encoder_with_depth_stage_trains_on_sentences_of_train_text(tiny_folder, tmp_path, capsys):
    """d1+w8a16 on a BERT: the student trains on the sentences of --train-text, shuffled, at --distill-lr."""
    import qruntime
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    from qruntime.eval.data import split_text

    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=256, max_position_embeddings=128)).save_pretrained(tmp_path / "bert")
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_folder)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(tmp_path / "bert")
    pieces = split_text("train")[:20000].split(". ")
    sentences = [s for s in pieces if len(s.split()) >= 4 and not any(c in s for c in ".!?\n")][:40]
    assert len(sentences) == 40
    (tmp_path / "mine.txt").write_text("\n".join(sentences), encoding="utf-8")  # one sentence a line
    out_dir = tmp_path / "ckpt"
    code, out, err = _run(capsys, "compress", tmp_path / "bert", "--recipe", "d1+w8a16", "--train-text",
                          tmp_path / "mine.txt", "--distill-steps", "3", "--distill-lr", "5e-4", "--out", out_dir,
                          "--quiet", "--json")
    assert code == 0, err
    report = json.loads(out)["report"]
    dist = report["distillation"]
    assert report["config"] == "d1+w8a16" and dist["student_layers"] == 1 and dist["steps"] == 3
    # 32 a batch: 2 batches, the 32 shortest sentences and the 8 longest; 3 steps see one of them twice
    lengths = sorted(len(tok(s, truncation=True, max_length=128)["input_ids"]) for s in sentences)
    assert dist["tokens"] in (2 * sum(lengths[:32]) + sum(lengths[32:]), sum(lengths[:32]) + 2 * sum(lengths[32:]))
    assert dist["config"]["lr"] == 5e-4 and dist["config"]["shuffle"] is True
    assert qruntime.load(out_dir).config.num_hidden_layers == 1
    # the 2:4 recovery of an encoder trains on the same sentence batches
    code, out, err = _run(capsys, "compress", tmp_path / "bert", "--recipe", "2:4-kd+w8a16", "--calib-samples", "2",
                          "--seq-len", "32", "--train-text", tmp_path / "mine.txt", "--distill-steps", "3",
                          "--out", tmp_path / "ckpt24", "--quiet", "--json")
    assert code == 0, err
    recovery = json.loads(out)["report"]["recovery"]
    assert recovery["steps"] == 3 and recovery["config"]["shuffle"] is True and recovery["tokens"] == dist["tokens"]
    code, out, err = _run(capsys, "compress", tmp_path / "bert", "--recipe", "d1+w8a16", "--distill-lr", "0",
                          "--out", out_dir)
    assert code == 2 and "--distill-lr=0.0: must be > 0" in err


def test_compress_2_4_with_recovery(tiny_folder, tmp_path, capsys):
    """2:4-kd+w8a16: SparseGPT masks, a masked KD fine-tune on the training split, INT8 kept values,
    saved and reloaded with the same outputs; `info` lists the 2:4 format."""
    import qruntime

    out_dir = tmp_path / "ckpt"
    code, out, err = _run(capsys, "compress", tiny_folder, "--recipe", "2:4-kd+w8a16", "--calib-samples", "2",
                          "--seq-len", "32", "--train-samples", "8", "--train-seq-len", "16", "--distill-steps", "2",
                          "--out", out_dir, "--quiet", "--json")
    assert code == 0, err
    report = json.loads(out)["report"]
    assert report["config"] == "2:4-kd+w8a16" and report["recovery"]["steps"] == 2
    assert all(l["format"] == "2:4+w8a16" and l["sparsity"] >= 0.5 for l in report["layers"])
    assert "2:4 recovery (masks fixed): 2 -> 2 blocks" in err
    model = qruntime.load(out_dir)
    assert any(isinstance(m, qruntime.SparseLinear) for m in model.modules())
    code, out, err = _run(capsys, "info", out_dir)
    assert code == 0 and "2:4+w8a16" in out


def test_compress_auto_budget_mixed_formats_round_trip(tiny_folder, tmp_path, capsys):
    """--recipe auto: INT4 with the accuracy budget; whatever mix of INT4 and INT8 it chooses is saved,
    and reloads with each layer in the format the report gives."""
    import qruntime

    out_dir = tmp_path / "ckpt"
    code, out, err = _run(capsys, "compress", tiny_folder, "--recipe", "auto", "--calib-samples", "2",
                          "--seq-len", "32", "--out", out_dir, "--quiet", "--json")
    assert code == 0, err
    report = json.loads(out)["report"]
    budget = report["budget"]
    assert report["config"] == "w4a16-g128-asym-gptq-clip-budget0.02" and budget["max_ppl_increase"] == 0.02
    assert budget["met"] == (budget["perplexity_ratio"] <= 1.02) and "accuracy budget: perplexity x" in err
    formats = {l["name"]: l["format"] for l in report["layers"]}
    assert {formats[n] for n in budget["promoted"]} <= {"w8a16"}
    assert all(f.startswith("w4a16") for n, f in formats.items() if n not in budget["promoted"])
    model = qruntime.load(out_dir)
    ids = torch.randint(0, 256, (1, 12))
    saved_formats = {n: m.weight_format.name for n, m in model.named_modules() if isinstance(m, qruntime.QuantLinear)}
    assert saved_formats == {n: parse_preset(f).quant.format.name for n, f in formats.items()}  # recipe -> format
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
