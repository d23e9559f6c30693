"""End-to-end CPU speed of a compressed causal LM vs the fp32 original: prefill and greedy decode.

    python bench/bench_cpu_e2e.py --model smollm2-135m --json bench/results/smollm2-135m_cpu_e2e.json

For each recipe (default: fp32, w8a8, w8a16, w4a16-g128, and torch.ao dynamic int8 on the same layers
as a peer), measured in one run on the same machine:
  prefill: one forward over --prefill tokens (median of --repeats), tokens/s, with logits for the last
           position only (logits_to_keep=1, as generate() does); the top-1 check below uses a full pass;
  decode:  --decode greedy steps with the KV cache after a --prompt-token prompt, tokens/s;
  top-1 agreement: share of the prefill positions whose next-token argmax equals the fp32 model's
  (a sanity check on the same text; bench/eval_causal_lm.py measures accuracy properly).
Recipes use round-to-nearest weights (GPTQ changes codes, not speed). "+head" variants also quantize
lm_head (excluded by default for accuracy), which is 21% of SmolLM2-135M's weights.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402


def _prefill(model, ids: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    times = []
    with torch.no_grad():
        model(ids[:, :32])
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - t0)
        top1 = model(ids, use_cache=False).logits[0].argmax(-1)
    return ids.shape[1] / statistics.median(times), top1


def _decode(model, prompt: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = model(tok, past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        dt = time.perf_counter() - t0
    return steps / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", nargs="+",
                    default=["fp32", "w8a8", "w8a16", "w4a16-g128", "w8a8+head", "torch.ao-int8"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from qruntime import compress
    from qruntime.api import select_targets
    from qruntime.config import DEFAULT_EXCLUDE, resolve_config
    from qruntime.data import split_text
    from qruntime.evaluate import tokenize_text
    from qruntime.models import load_causal_lm

    base, tok = load_causal_lm(args.model)
    ids = tokenize_text(tok, split_text("eval"), args.prefill)[None, :]
    prompt = ids[:, : args.prompt]
    env = environment()
    print(f"# {args.model}; {env['cpu']}; {torch.get_num_threads()} threads; torch {env['torch']}; "
          f"{env['cpu_backend']}")
    rows, ref_tokens = [], None
    for recipe in args.recipes:
        if recipe == "fp32":
            model = base
        elif recipe == "torch.ao-int8":
            names, _ = select_targets(base, resolve_config("w8a8"))
            spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, _ in names}
            model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), spec, dtype=torch.qint8)
        else:
            preset, _, extra = recipe.partition("+")
            exclude = tuple(p for p in DEFAULT_EXCLUDE if "lm_head" not in p) if extra == "head" else DEFAULT_EXCLUDE
            model, _ = compress(base, resolve_config(preset, exclude=exclude), inplace=False, progress=False)
        model.eval()
        prefill, top1 = _prefill(model, ids, args.repeats)
        decode = _decode(model, prompt, args.decode)
        if ref_tokens is None:
            ref_tokens = top1
        agree = (top1 == ref_tokens).float().mean().item()
        rows.append({"recipe": recipe, "prefill_tok_s": prefill, "decode_tok_s": decode, "top1_agreement": agree})
        r0 = rows[0]
        print(f"{recipe:<16} prefill {prefill:8.1f} tok/s (x{prefill / r0['prefill_tok_s']:.2f})   "
              f"decode {decode:7.2f} tok/s (x{decode / r0['decode_tok_s']:.2f})   top-1 agreement {agree:.3f}",
              flush=True)
        if model is not base:
            del model
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
