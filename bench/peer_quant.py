"""Peer comparison for weight quantization: llm-compressor (GPTQ, AWQ), torchao, optimum-quanto and HQQ vs
qruntime, one run, same model, calibration windows and perplexity protocol as bench/eval_causal_lm.py.

Runs in the peer venv of bench/peer_sparsegpt.py (llm-compressor 0.14 pins transformers <= 5.17), plus
torchao, optimum-quanto and HQQ:

    /tmp/peer/bin/pip install "torchao==0.18.*" "optimum-quanto==0.2.*" "hqq==0.2.*"
    /tmp/peer/bin/python bench/peer_quant.py --json bench/results/smollm2-135m_cpu_peer_quant_all_c128.json
    /tmp/peer/bin/python bench/peer_quant.py --smoke          # a random 2-layer Llama, seconds

Rows (each one deep copy of the float model; a peer that refuses a setting is a row with its error):
- llm-compressor GPTQModifier, W4A16 groups of --group asymmetric (and symmetric), static act-order,
  dampening 0.01 (its defaults; the same as qruntime's), every Linear but lm_head.
- llm-compressor AWQModifier (W4A16 asymmetric, groups of --group) then its GPTQ, as its examples combine
  them (--skip-awq to leave it out: it is the slowest row).
- torchao quantize_: Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig (W8A8 dynamic),
  IntxWeightOnlyConfig int4 per group (asymmetric; its CPU path) at --group and 128.
- optimum-quanto quantize + freeze: qint4 weights (its own group choice: 128, or the largest multiple of 32
  below it that divides the input columns, so 96 for SmolLM2's 576), qint8 weights, and W8A8 (qint8
  weights and activations, activation ranges from its Calibration pass over the calibration windows).
- HQQ (half-quadratic, data-free): every Linear but lm_head replaced by HQQLinear, 4 bits, groups of --group
  and 128 (HQQ groups the flattened weight, so with 576 columns a group of 128 spans two rows).
- qruntime.compress with --qruntime presets.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback
from importlib.metadata import version

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402
from peer_sparsegpt import tiny_model  # noqa: E402

import torch  # noqa: E402


def _dataset(calib: list[torch.Tensor]):
    from datasets import Dataset

    window = calib[0].shape[-1]
    return Dataset.from_dict({"input_ids": [c.reshape(-1).tolist() for c in calib],
                              "attention_mask": [[1] * window for _ in calib]})


def _w4_scheme(group: int, symmetric: bool) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": symmetric,
                                                          "strategy": "group", "group_size": group}}}


def llmcompressor_row(model, tok, calib, group: int, symmetric: bool, awq: bool):
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    recipe = []
    if awq:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe.append(AWQModifier(ignore=["lm_head"], config_groups=_w4_scheme(group, symmetric)))
    recipe.append(GPTQModifier(ignore=["lm_head"], config_groups=_w4_scheme(group, symmetric), dampening_frac=0.01))
    window = calib[0].shape[-1]
    start = time.perf_counter()
    model = oneshot(model=model, processor=tok, recipe=recipe, dataset=_dataset(calib),
                    num_calibration_samples=len(calib), max_seq_length=window, shuffle_calibration_samples=False,
                    batch_size=1)
    return model.eval(), time.perf_counter() - start


def torchao_row(model, config):
    from torchao.quantization import quantize_

    start = time.perf_counter()
    quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    return model.eval(), time.perf_counter() - start


def quanto_row(model, weights: str, activations: str | None = None, calib=None):
    from optimum import quanto

    start = time.perf_counter()
    quanto.quantize(model, weights=getattr(quanto, weights),
                    activations=getattr(quanto, activations) if activations else None, exclude=["lm_head"])
    if activations:
        with torch.no_grad(), quanto.Calibration():
            for batch in calib:
                model(batch)
    quanto.freeze(model)
    return model.eval(), time.perf_counter() - start


def hqq_row(model, nbits: int, group: int):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    start = time.perf_counter()
    config = BaseQuantizeConfig(nbits=nbits, group_size=group)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                setattr(parent, name, HQQLinear(child, config, compute_dtype=torch.float32, device="cpu"))
    return model.eval(), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--qruntime", nargs="*", default=["w4a16-g64-gptq", "w4a16-g64-gptq-clip-awq", "w8a16-gptq-clip",
                                                     "w8a8-sqauto"])
    p.add_argument("--skip-awq", action="store_true")
    p.add_argument("--skip-llmcompressor", action="store_true")
    p.add_argument("--skip-torchao", action="store_true")
    p.add_argument("--skip-quanto", action="store_true")
    p.add_argument("--skip-hqq", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.smoke:
        args.calib_samples, args.window, args.eval_tokens = 2, 64, 256

    from qruntime import compress
    from qruntime.eval.data import calibration_batches
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import evaluate_causal_lm, tokenize_text
    from qruntime.eval.models import load_causal_lm

    tmp = tempfile.TemporaryDirectory(prefix="peer-quant-")
    if args.smoke:
        from transformers import AutoTokenizer

        from qruntime.eval.models import smollm2_path

        tok = AutoTokenizer.from_pretrained(smollm2_path())
        original = tiny_model(tok, tmp.name)
        args.model = "random 2-layer Llama (hidden 64), smoke test"
    else:
        original, tok = load_causal_lm(args.model)
    ids = tokenize_text(tok, split_text("eval"), args.eval_tokens)
    calib = calibration_batches(tok, num_samples=args.calib_samples, seq_len=args.window)
    versions: dict[str, str] = {}
    jobs = []
    if not args.skip_llmcompressor:
        import llmcompressor

        versions["llmcompressor"] = llmcompressor.__version__
        lc = f"llm-compressor {llmcompressor.__version__}"
        for sym in (False, True):
            jobs.append((f"{lc} GPTQ W4A16 g{args.group} {'sym' if sym else 'asym'}",
                         lambda m, s=sym: llmcompressor_row(m, tok, calib, args.group, s, False)))
        jobs.append((f"{lc} GPTQ W4A16 g128 asym",
                     lambda m: llmcompressor_row(m, tok, calib, 128, False, False)))
        if not args.skip_awq:
            jobs.append((f"{lc} AWQ + GPTQ W4A16 g{args.group} asym",
                         lambda m: llmcompressor_row(m, tok, calib, args.group, False, True)))
    if not args.skip_torchao:
        import torchao
        from torchao.quantization import (Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
                                          IntxWeightOnlyConfig)
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType

        versions["torchao"] = torchao.__version__
        ta = f"torchao {torchao.__version__}"
        jobs.append((f"{ta} int8 weight-only", lambda m: torchao_row(m, Int8WeightOnlyConfig())))
        jobs.append((f"{ta} W8A8 dynamic", lambda m: torchao_row(m, Int8DynamicActivationInt8WeightConfig())))
        for g in (args.group, 128):
            jobs.append((f"{ta} int4 g{g} asym (intx weight-only)",
                         lambda m, g=g: torchao_row(m, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(g),
                                                                             mapping_type=MappingType.ASYMMETRIC))))
    if not args.skip_quanto:
        versions["optimum-quanto"] = version("optimum-quanto")
        qt = f"optimum-quanto {versions['optimum-quanto']}"
        jobs.append((f"{qt} qint4 weights (g128, g96 on 576 columns)", lambda m: quanto_row(m, "qint4")))
        jobs.append((f"{qt} qint8 weights", lambda m: quanto_row(m, "qint8")))
        jobs.append((f"{qt} W8A8 (qint8 weights + activations, calibrated)",
                     lambda m: quanto_row(m, "qint8", "qint8", calib)))
    if not args.skip_hqq:
        versions["hqq"] = version("hqq")
        for g in (args.group, 128):
            jobs.append((f"HQQ {versions['hqq']} int4 g{g} (data-free)", lambda m, g=g: hqq_row(m, 4, g)))
    for preset in args.qruntime:
        jobs.append((f"qruntime {preset}",
                     lambda m, preset=preset: (lambda t0: (compress(m, preset, calib, progress=False)[0],
                                                           time.perf_counter() - t0))(time.perf_counter())))

    rows = []
    for name, job in jobs:
        print(f"--- {name}", flush=True)
        try:
            model, seconds = job(copy.deepcopy(original))
        except Exception as exc:  # a refusal is a result too
            rows.append({"method": name, "error": f"{type(exc).__name__}: {exc}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]})
            print(f"    refused: {rows[-1]['error'][:300]}", flush=True)
            continue
        try:
            result = evaluate_causal_lm(model, ids, reference=original, window=args.window)
        except Exception as exc:  # a model that quantizes but cannot run is a refusal too
            rows.append({"method": name, "error": f"{type(exc).__name__} in evaluation: {exc}"[:2000],
                         "traceback": traceback.format_exc()[-4000:]})
            print(f"    failed in evaluation: {rows[-1]['error'][:300]}", flush=True)
            continue
        rows.append({"method": name, "seconds": seconds, "eval": result.to_dict()})
        print(f"    ppl ratio {result.perplexity_ratio:.4f} in {seconds:.1f} s", flush=True)
        del model

    env = environment()
    env.update(versions)
    e0 = next(r["eval"] for r in rows if "eval" in r)
    print(f"\nmodel {args.model}; protocol: {e0['protocol']}; calibration: {len(calib)} windows of {args.window} "
          f"tokens; original perplexity {e0['reference_perplexity']:.3f}")
    print(f"{'method':<52} {'seconds':>8} {'ppl':>9} {'ppl ratio':>10} {'top-1 agree':>12} {'KL nats/tok':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<52} refused: {r['error'][:120]}")
            continue
        e = r["eval"]
        print(f"{r['method']:<52} {r['seconds']:>8.1f} {e['perplexity']:>9.3f} {e['perplexity_ratio']:>10.4f} "
              f"{100 * e['top1_agreement']:>11.2f}% {e['kl_divergence']:>12.5f}")
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    tmp.cleanup()


if __name__ == "__main__":
    main()
