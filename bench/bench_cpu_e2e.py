"""End-to-end CPU speed of a compressed causal LM vs the fp32 original: prefill and greedy decode.

    python bench/bench_cpu_e2e.py --model smollm2-135m --json bench/results/smollm2-135m_cpu_e2e.json

For each recipe (default: fp32, w8a8-nosq, w8a16, w4a16-g128-rtn, and torch.ao dynamic int8 on the same
layers as a peer), measured in one run on the same machine:
  prefill: one forward over --prefill tokens, tokens/s, with logits for the last position only
           (logits_to_keep=1, as generate() does);
  decode:  --decode greedy steps with the KV cache after a --prompt-token prompt, tokens/s;
  both measured in --rounds interleaved rounds (each round runs every recipe once), medians reported;
  top-1 agreement: share of the prefill positions whose next-token argmax equals the fp32 model's
  (a sanity check on the same text; bench/eval_causal_lm.py measures accuracy properly).
Each recipe runs on each of --paths: "hf", the model's own forward (what model.generate runs), and
"qruntime", the qruntime decoder (qruntime.Decoder: fused projections, a decoding step as one C++ call);
a row's "path" says which ran it, and its top-1 agreement is computed on that path (the decoder's own
prefill).
The default recipes are the data-free ones (round-to-nearest weights, no SmoothQuant): GPTQ and
SmoothQuant change the codes and scales, not the kernels or the speed. "+head" variants also quantize
lm_head (excluded by default for accuracy), which is 21% of SmolLM2-135M's weights.

With --llama-cpp (llama.cpp's bin folder, see bench/llamacpp_runner.py), llama.cpp runs in the same
rounds: the model's own GGUF requantized to --gguf-types, timed by llama-bench with -p --prefill and
-n --decode on the same threads. Comparable qruntime settings: --prompt 1 (llama-bench generates from
an empty context). The run behind bench/results/smollm2-135m_cpu_e2e_llamacpp.json:

    python bench/bench_cpu_e2e.py --prefill 128 --prompt 1 --decode 64 --llama-cpp .../build/bin \
        --recipes fp32 w8a16 w8a8-nosq w8a8-nosq+head w8a8-nosq-emb8+head w4a16-g128-rtn \
        w4a16-g32-rtn-emb4+head torch.ao-int8
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402
import llamacpp_runner as llama_cpp  # noqa: E402 (not the llama-cpp-python package)


def _top1(model, ids: torch.Tensor, path: str) -> torch.Tensor:
    """Next-token argmax at every prefill position, computed on ``path`` (the decoder's own prefill)."""
    from qruntime.eval.speed import runner

    with torch.no_grad():
        model(ids[:, :32])  # warm-up (first-call work such as the CPU layouts is not timed)
        run, _ = runner(model, path)
        if run is model:
            return model(ids, use_cache=False).logits.argmax(-1)[0]
        return run.prefill(ids, all_logits=True).argmax(-1)


def _medians(runs: list[dict]) -> dict:
    """Medians over rounds of prefill / decode tokens/s, with every round's values."""
    out = {}
    for key in ("prefill_tok_s", "decode_tok_s"):
        values = [r[key] for r in runs]
        out[key], out[key + "_all"] = statistics.median(values), values
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", nargs="+",
                    default=["fp32", "w8a8-nosq", "w8a16", "w4a16-g128-rtn", "w8a8-nosq+head", "torch.ao-int8"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--decode", type=int, default=32, help="greedy steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    ap.add_argument("--paths", nargs="+", choices=["hf", "qruntime"], default=["hf", "qruntime"],
                    help="what runs each recipe: the model's own forward (hf) and/or the qruntime decoder")
    ap.add_argument("--json", default=None)
    ap.add_argument("--llama-cpp", default=None,
                    help="llama.cpp bin folder (llama-bench, llama-quantize; default $LLAMA_CPP_BIN): "
                         "its rows are measured in the same rounds (bench/llama_cpp.py says how to build it)")
    ap.add_argument("--gguf-types", nargs="+", default=["F32", "Q8_0", "Q4_0"],
                    help="llama.cpp weight types, made from the model's own GGUF by llama-quantize")
    ap.add_argument("--no-repack", action="store_true", help="llama-bench --repack 0")
    args = ap.parse_args(argv)
    llama_bin = llama_cpp.find_bin(args.llama_cpp)
    if llama_bin is not None and args.model != "smollm2-135m":
        raise SystemExit("--llama-cpp: only smollm2-135m ships a GGUF to quantize")

    from qruntime import compress
    from qruntime.nn.targets import select_targets
    from qruntime.nn.targets import DEFAULT_EXCLUDE, OUTPUT_HEAD
    from qruntime.recipes.presets import resolve_config
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import tokenize_text
    from qruntime.eval.models import load_causal_lm
    from qruntime.eval.speed import compare_causal_lm

    base, tok = load_causal_lm(args.model)
    ids = tokenize_text(tok, split_text("eval"), args.prefill)[None, :]
    env = environment()
    print(f"# {args.model}; {env['cpu']}; {torch.get_num_threads()} threads; torch {env['torch']}; "
          f"{env['cpu_backend']}; {args.rounds} interleaved rounds, medians")
    models = {}
    for recipe in args.recipes:
        if recipe == "fp32":
            models[recipe] = base
        elif recipe == "torch.ao-int8":
            names, _ = select_targets(base, resolve_config("w8a8-nosq"))
            spec = {name: torch.ao.quantization.default_dynamic_qconfig for name, _ in names}
            models[recipe] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), spec, dtype=torch.qint8)
        else:
            preset, _, extra = recipe.partition("+")
            exclude = (tuple(p for p in DEFAULT_EXCLUDE if p != OUTPUT_HEAD and "lm_head" not in p)
                       if extra == "head" else DEFAULT_EXCLUDE)
            models[recipe], _ = compress(base, resolve_config(preset, exclude=exclude), inplace=False, progress=False)
        models[recipe].eval()
    # The machine's speed drifts (shared cores): every round measures every recipe once, side by side,
    # and llama.cpp's files right after qruntime's models.
    runs_of = {(recipe, path): m for recipe, m in models.items() for path in args.paths}
    top1 = {key: _top1(m, ids, key[1]) for key, m in runs_of.items()}
    ggufs = {}
    if llama_bin is not None:
        from qruntime.eval.data import cache_dir
        from qruntime.eval.models import smollm2_gguf

        source = smollm2_gguf()
        ggufs = {f"llama.cpp {t}": llama_cpp.quantized(llama_bin, source, t, cache_dir() / "llama_cpp") for t in args.gguf_types}
    named = {f"{recipe} [{path}]": (recipe, path) for recipe, path in runs_of}
    runs = {name: [] for name in [*named, *ggufs]}
    described = {}
    for _ in range(args.rounds):
        one = compare_causal_lm({n: runs_of[k] for n, k in named.items()}, ids, prompt_len=args.prompt,
                                decode_steps=args.decode, rounds=1, paths={n: k[1] for n, k in named.items()})
        for name in named:
            runs[name].append(one[name])
            described[name] = one[name]["path"]
        for name, path in ggufs.items():
            runs[name].append(llama_cpp.bench(llama_bin, path, ids.shape[1], args.decode, torch.get_num_threads(),
                                              repack=not args.no_repack))
    speed = {name: _medians(r) for name, r in runs.items()}
    rows = []
    baseline = top1[next(iter(runs_of))]
    for name in [*named, *ggufs]:
        p, d = speed[name]["prefill_tok_s"], speed[name]["decode_tok_s"]
        recipe, path = named.get(name, (name, None))
        agree = (top1[(recipe, path)] == baseline).float().mean().item() if path else None
        rows.append({"recipe": recipe, "path": described.get(name, "llama.cpp"), **speed[name], "top1_agreement": agree})
        r0 = rows[0]
        print(f"{name:<36} prefill {p:8.1f} tok/s (x{p / r0['prefill_tok_s']:.2f})   "
              f"decode {d:7.2f} tok/s (x{d / r0['decode_tok_s']:.2f})   top-1 agreement " + ("-" if agree is None else f"{agree:.3f}"), flush=True)
    write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
