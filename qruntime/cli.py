"""The ``qruntime`` command line.

    qruntime demo                                   compress the default model, print what was gained and lost
    qruntime compress MODEL --recipe R --out DIR    compress and save a checkpoint
    qruntime eval DIR|MODEL [--ppl] [--acc] [--tasks]  perplexity / accuracy (vs the base model when known)
    qruntime bench DIR|MODEL [--reference MODEL]    prefill and decode tokens/s, side by side
    qruntime info DIR [--verify]                    what a checkpoint holds
    qruntime export DIR --out OUT                   write a compressed-tensors checkpoint (transformers, vLLM)
    qruntime presets                                the recipe names

MODEL is a default-model alias (smollm2-135m, minilm-l6), a local folder or an HF hub name (online).
Every command takes ``--json [FILE]`` (JSON to FILE, or to stdout without FILE) and ``--quiet`` (no progress
bars). On failure a command
prints one line ``qruntime: error: ...`` and exits with 2 (bad input) or 1 (anything else); set
QRUNTIME_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import replace


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _emit_json(target: str | None, payload: dict) -> None:
    """``--json`` without a file prints to stdout; with one writes it."""
    if target is None:
        return
    text = json.dumps(payload, indent=2)
    if target == "-":
        print(text)
    else:
        with open(target, "w") as f:
            f.write(text + "\n")
        print(f"wrote {target}", file=sys.stderr)


def _say(args, *lines: str) -> None:
    """Human-readable output; with ``--json`` to stdout it goes to stderr so stdout stays JSON."""
    stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    for line in lines:
        print(line, file=stream)


def _versions() -> dict:
    import torch

    from .version import versions

    return {**versions(), "threads": torch.get_num_threads()}


def run_demo(
    model_name: str, preset: str, eval_tokens: int, window: int, calib_samples: int, json_path: str | None = None,
    *, quiet: bool = False, speed_rounds: int = 3,
) -> dict:
    """Compresses ``model_name`` with ``preset``, evaluates both models and prints what was gained and lost.
    ``json_path``: also the results as JSON, to that file, or to stdout with ``"-"`` (the table then goes to
    stderr); ``quiet``: no progress bars (transformers' own included); ``speed_rounds``: rounds of the
    side-by-side prefill and decode timing (medians reported; 0 skips it)."""
    with _library_bars_off() if quiet else contextlib.nullcontext():
        return _demo(model_name, preset, eval_tokens, window, calib_samples, json_path, quiet, speed_rounds)


def _demo(model_name: str, preset: str, eval_tokens: int, window: int, calib_samples: int, json_path: str | None,
          quiet: bool, speed_rounds: int) -> dict:
    import torch

    from . import __version__, compress
    from .eval.data import calibration_batches
    from .recipes.presets import resolve_config
    from .eval.data import split_text
    from .eval.evaluate import evaluate_causal_lm, tokenize_text
    from .eval.models import load_causal_lm
    from .eval.speed import compare_causal_lm

    cfg = resolve_config(preset)  # a bad recipe fails before the model is loaded
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(model_name)
    load_s = time.perf_counter() - t0
    ids = tokenize_text(tokenizer, split_text("eval"), max_tokens=eval_tokens)

    calib = None
    if cfg.needs_calibration:
        calib = calibration_batches(tokenizer, num_samples=calib_samples, seq_len=window)
    qmodel, report = compress(model, cfg, calib, inplace=False, progress=not quiet)
    result = evaluate_causal_lm(qmodel, ids, reference=model, window=window, progress=not quiet)
    speed = None
    if speed_rounds:
        # prefill up to 256 tokens, decode up to 32 steps after up to 32 tokens: within the perplexity
        # window, which the evaluation has just run, so within the model's positions
        prefill = ids[: min(256, window, len(ids))].unsqueeze(0)
        prompt_len = min(32, max(1, prefill.shape[1] // 2))
        # the original as a user runs it before (its own forward), the compressed one as qruntime runs it
        speed = compare_causal_lm({"original": model, "compressed": qmodel}, prefill, prompt_len=prompt_len,
                                  decode_steps=min(32, window - prompt_len), rounds=speed_rounds,
                                  paths={"original": "hf", "compressed": "auto"})

    params = sum(p.numel() for p in model.parameters())
    rows = [
        ("model", model_name, ""),
        ("recipe", report.config, ""),
        ("parameters", f"{params:,}", ""),
        ("Linear weights converted", f"{len(report.layers)} layers",
         f"{len(report.skipped)} left as they are ({_fmt_bytes(report.skipped_bytes)}: report.skipped)"),
        ("Linear weight bytes", _fmt_bytes(report.weight_bytes_before), _fmt_bytes(report.weight_bytes_after)),
        ("all weight matrix bytes", _fmt_bytes(report.total_weight_bytes_before),
         _fmt_bytes(report.total_weight_bytes_after)),
        ("whole model bytes", _fmt_bytes(report.model_bytes_before), _fmt_bytes(report.model_bytes_after)),
        ("perplexity (Wikipedia eval split)", f"{result.reference_perplexity:.3f}", f"{result.perplexity:.3f}"),
        ("next-token top-1 agreement", "", f"{100 * result.top1_agreement:.2f} %"),
        ("KL(original || compressed)", "", f"{result.kl_divergence:.5f} nats/token"),
    ]
    faster = ""
    if speed is not None:
        o, c = speed["original"], speed["compressed"]
        rows += [
            (f"prefill tokens/s ({prefill.shape[1]} tokens)", f"{o['prefill_tok_s']:.0f}",
             f"{c['prefill_tok_s']:.0f} ({c['prefill_tok_s'] / o['prefill_tok_s']:.2f}x)"),
            ("decode tokens/s (greedy, KV cache)", f"{o['decode_tok_s']:.1f}",
             f"{c['decode_tok_s']:.1f} ({c['decode_tok_s'] / o['decode_tok_s']:.2f}x)"),
            ("run by", o["path"], c["path"]),
        ]
        faster = (f", decode {c['decode_tok_s'] / o['decode_tok_s']:.2f}x and prefill "
                  f"{c['prefill_tok_s'] / o['prefill_tok_s']:.2f}x the original's speed (the compressed model on the "
                  f"{c['path']}, the original on its {o['path']}; medians of {speed_rounds} interleaved rounds)")
    say = argparse.Namespace(json=json_path)
    _say(say, "", f"{'':<36} {'original':>20} {'compressed':>24}")
    _say(say, *(f"{label:<36} {before:>20} {after:>24}" for label, before, after in rows))
    _say(
        say,
        f"\nLinear weights {report.weight_compression:.2f}x smaller{faster}; perplexity x{result.perplexity_ratio:.4f}; "
        f"protocol: {result.protocol}.",
        f"time: load {load_s:.1f} s, compress (calibration included) {report.seconds:.1f} s, evaluate both models {result.seconds:.1f} s "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads, CPU backend: {report.cpu_backend})",
    )
    summary = {
        "qruntime": __version__,
        "torch": torch.__version__,
        "model": model_name,
        "parameters": params,
        "load_seconds": load_s,
        "report": report.to_dict(),
        "eval": result.to_dict(),
        "speed": speed,
    }
    _emit_json(json_path, summary)
    return summary


def cmd_compress(args) -> dict:
    import torch

    from . import compress
    from .calibration.stats import sentence_batches, text_batches
    from .eval.data import calibration_batches
    from .io.checkpoint import save
    from .recipes.presets import resolve_config
    from .eval.data import split_text
    from .eval.models import load_model

    cfg = resolve_config(args.recipe)  # a bad recipe fails before the model is loaded
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: exists and is not a folder")
    t0 = time.perf_counter()
    model, tokenizer, kind = load_model(args.model)
    load_s = time.perf_counter() - t0
    calib = None
    if cfg.needs_calibration:
        if tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer to tokenize the calibration text with")
        if args.calib == "wiki":
            calib = calibration_batches(tokenizer, num_samples=args.calib_samples, seq_len=args.seq_len)
        else:
            with open(args.calib, encoding="utf-8") as f:
                text = f.read()
            calib = text_batches(tokenizer, text, args.calib_samples, args.seq_len, source=args.calib)
    train = held_out = None
    recover = cfg.sparsity.recover if cfg.sparsity is not None else None
    if cfg.distill is not None or recover is not None:
        # the depth stage and the 2:4 recovery distill on --train-text (default: the Wikipedia training split)
        if tokenizer is None:
            raise ValueError(f"{args.model}: no tokenizer to tokenize the training text with")
        text = None
        if args.train_text != "wiki":
            with open(args.train_text, encoding="utf-8") as f:
                text = f.read()
        budget = dict(steps=args.distill_steps, max_seconds=args.distill_minutes * 60 if args.distill_minutes else None)
        if args.distill_lr is not None:
            budget["lr"] = args.distill_lr
        if kind == "encoder":
            # its sentences, 32 a batch, batched by length (little padding) and so shuffled (docs/distillation.md
            # section 4); the report's held-out metrics on 4 batches of calibration-split sentences in text order
            train = sentence_batches(tokenizer, split_text("train") if text is None else text, 32, 128)
            held_out = sentence_batches(tokenizer, split_text("calibration"), 32, 128, sort_by_length=False, limit=4)
            budget["shuffle"] = True
        else:
            if text is None:
                windows = calibration_batches(tokenizer, num_samples=args.train_samples, seq_len=args.train_seq_len,
                                              split="train")
            else:
                windows = text_batches(tokenizer, text, args.train_samples, args.train_seq_len, source=args.train_text)
            train = [torch.cat(windows[i : i + 4]) for i in range(0, len(windows) - 3, 4)]  # batches of 4 windows
            # the report then gives teacher and student metrics on 4 held-out windows
            held_out = calibration_batches(tokenizer, num_samples=4, seq_len=args.train_seq_len)
        if cfg.distill is not None:
            cfg = replace(cfg, distill=replace(cfg.distill, **budget))
        if recover is not None:
            cfg = replace(cfg, sparsity=replace(cfg.sparsity, recover=replace(recover, **budget)))
    model, report = compress(model, cfg, calib, train_data=train, eval_data=held_out, progress=not args.quiet,
                             device=args.device, calib_precision=args.calib_precision)
    t1 = time.perf_counter()
    folder = save(model, args.out, tokenizer=tokenizer, report=report, base_model=args.model)
    save_s = time.perf_counter() - t1
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    _say(args, report.table(max_layers=None if args.all_layers else 12))
    _say(args, f"saved {folder} ({_fmt_bytes(size)} on disk; load {load_s:.1f} s, save {save_s:.1f} s)")
    return {"model": args.model, "kind": kind, "out": str(folder), "bytes_on_disk": size,
            "load_seconds": load_s, "save_seconds": save_s, "report": report.to_dict(), "versions": _versions()}


def _reference_name(target: str, reference: str | None) -> str | None:
    """--reference: a model, 'none', or (default) the base model a checkpoint records."""
    if reference is not None:
        return None if reference.lower() == "none" else reference
    from .io.checkpoint import MANIFEST, read_manifest

    if os.path.exists(os.path.join(target, MANIFEST)):
        return read_manifest(target).get("base_model")
    return None


def cmd_eval(args) -> dict:
    from .eval.data import movie_reviews, split_text
    from .eval.evaluate import evaluate_causal_lm, evaluate_encoder, tokenize_text
    from .eval.models import load_model

    want_ppl, want_acc = args.ppl, args.acc
    if not (want_ppl or want_acc):
        want_ppl = want_acc = True
    model, tokenizer, kind = load_model(args.target)
    ref_name = _reference_name(args.target, args.reference)
    reference, ref_tok = (None, None)
    if ref_name is not None:
        reference, ref_tok, ref_kind = load_model(ref_name)
        if ref_kind != kind:
            raise ValueError(f"--reference {ref_name} is a {ref_kind}, {args.target} is a {kind}")
    tokenizer = tokenizer or ref_tok
    if tokenizer is None:
        raise ValueError(f"{args.target}: no tokenizer saved with it and no --reference to take one from")
    out: dict = {"target": args.target, "kind": kind, "reference": ref_name, "versions": _versions()}
    if args.tasks and kind == "causal-lm":
        raise ValueError(f"--tasks: scores sentence embeddings; {args.target} is a causal LM, not an encoder")
    if kind == "causal-lm":
        ids = tokenize_text(tokenizer, split_text("eval"), max_tokens=args.eval_tokens)
        res = evaluate_causal_lm(model, ids, reference=reference, window=args.window, progress=not args.quiet)
        out["causal_lm"] = res.to_dict()
        lines = [f"{args.target} ({kind}); protocol: Wikipedia eval split, {res.protocol}"]
        if want_ppl:
            lines.append(f"perplexity {res.perplexity:.4f}")
            if reference is not None:
                lines.append(f"reference perplexity {res.reference_perplexity:.4f} ({ref_name}); ratio {res.perplexity_ratio:.4f}")
        if want_acc:
            lines.append(f"next-token accuracy {100 * res.token_accuracy:.2f} %")
            if reference is not None:
                lines.append(f"top-1 agreement with the reference {100 * res.top1_agreement:.2f} %; "
                             f"KL(reference || model) {res.kl_divergence:.5f} nats/token")
    else:
        if args.ppl:
            raise ValueError(f"--ppl: {args.target} is an encoder ({type(model).__name__}); perplexity needs a causal LM")
        reviews = movie_reviews()
        sentences, labels = [s for s, _ in reviews], [y for _, y in reviews]
        res = evaluate_encoder(model, reference if reference is not None else model, tokenizer, sentences, labels)
        out["encoder"] = res.to_dict()
        lines = [f"{args.target} ({kind}); protocol: movie-review sentences, {res.protocol}",
                 f"linear-probe accuracy {100 * res.probe_accuracy_model:.2f} %"]
        if reference is not None:
            lines[-1] += (f" (the reference's probe); {100 * res.probe_accuracy_model_refit:.2f} % with a probe refit "
                          "on its own embeddings")
            lines += [f"reference probe accuracy {100 * res.probe_accuracy_reference:.2f} % ({ref_name})",
                      f"embedding cosine to the reference: mean {res.cosine_mean:.5f}, min {res.cosine_min:.5f}"]
            if res.probe_cv_reference is not None:
                lines.append("cross-validated probe accuracy: " + _probe_comparison(
                    res.probe_cv_reference, res.probe_cv_model, res.probe_cv_model_se, res.probe_cv_model_refit,
                    res.probe_cv_refit_se))
        elif res.probe_cv_reference is not None:
            lines.append(f"cross-validated probe accuracy {100 * res.probe_cv_reference:.2f} %")
        if args.tasks:
            from .eval.evaluate import evaluate_encoder_tasks

            tasks = evaluate_encoder_tasks(model, reference if reference is not None else model, tokenizer)
            out["encoder_tasks"] = tasks.to_dict()
            lines += _task_lines(tasks.to_dict(), reference is not None)
    _say(args, *lines)
    return out


def _probe_comparison(reference: float, model: float, model_se: float, refit: float, refit_se: float) -> str:
    return (f"{100 * model:.2f} % (the reference's probes; {100 * (model - reference):+.2f} +- {100 * model_se:.2f} points), "
            f"{100 * refit:.2f} % refit ({100 * (refit - reference):+.2f} +- {100 * refit_se:.2f}); "
            f"reference {100 * reference:.2f} %")


def _task_lines(t: dict, against_reference: bool) -> list[str]:
    """``EncoderTasksEval.to_dict()`` as lines: the two cross-validated probes and the Lee correlation."""
    lines = []
    for key, what in (("sentiment", f"{t['sentiment']['sentences']} movie-review sentences (sentiment)"),
                      ("newsgroups", f"{t['newsgroups']['posts']} Usenet posts (topic)")):
        p = t[key]
        lines.append(f"cross-validated probe accuracy on {what}: " + (
            _probe_comparison(p["reference"], p["model"], p["model_se"], p["model_refit"], p["refit_se"])
            if against_reference else f"{100 * p['reference']:.2f} %"))
    lee = t["lee"]
    line = (f"Lee news similarity ({lee['pairs']} rated pairs): Pearson {lee['model_pearson']:.3f}, "
            f"Spearman {lee['model_spearman']:.3f}")
    if against_reference:
        line += (f"; reference {lee['reference_pearson']:.3f} / {lee['reference_spearman']:.3f} "
                 f"(Pearson {lee['model_pearson'] - lee['reference_pearson']:+.3f} +- {lee['pearson_se']:.3f})")
    return lines + [line]


def cmd_bench(args) -> dict:
    import torch

    from .eval.data import movie_reviews, split_text
    from .eval.evaluate import tokenize_text
    from .eval.models import load_model
    from .eval.speed import compare_causal_lm, compare_encoder

    model, tokenizer, kind = load_model(args.target)
    models = {args.target: model.eval()}
    ref_name = _reference_name(args.target, args.reference)
    if ref_name is not None:
        reference, ref_tok, ref_kind = load_model(ref_name)
        if ref_kind != kind:
            raise ValueError(f"--reference {ref_name} is a {ref_kind}, {args.target} is a {kind}")
        models[ref_name] = reference.eval()
        tokenizer = tokenizer or ref_tok
    if tokenizer is None:
        raise ValueError(f"{args.target}: no tokenizer saved with it and no --reference to take one from")
    names = list(models)
    header = f"# {kind}; torch {torch.__version__}, {torch.get_num_threads()} threads; {args.rounds} interleaved rounds, medians"
    if kind == "causal-lm":
        ids = tokenize_text(tokenizer, split_text("eval"), max_tokens=args.prefill)[None, :]
        res = compare_causal_lm(models, ids, prompt_len=min(args.prompt, ids.shape[1]), decode_steps=args.decode,
                                rounds=args.rounds, paths=args.decoder)
        lines = [header + f"; prefill {ids.shape[1]} tokens, decode {args.decode} steps after {args.prompt}",
                 f"# llama.cpp's figures for the same work: llama-bench -p {ids.shape[1]} -n {args.decode} "
                 f"-t {torch.get_num_threads()} (its decode starts from an empty context: --prompt 1 here)"]
        for name in names:
            r = res[name]
            ratio = ""
            if len(names) > 1 and name == names[0]:
                ref = res[names[1]]
                ratio = f"   (x{r['prefill_tok_s'] / ref['prefill_tok_s']:.2f} prefill, x{r['decode_tok_s'] / ref['decode_tok_s']:.2f} decode vs reference)"
            lines.append(f"{name}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} tok/s{ratio}"
                         f"   [{r['path']}]")
    else:
        sentences = [s for s, _ in movie_reviews()][: args.batch]
        batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
        res = compare_encoder(models, dict(batch), rounds=args.rounds)
        lines = [header + f"; batch of {len(sentences)} sentences"]
        for name in names:
            ratio = f" (x{res[name]['sentences_s'] / res[names[1]]['sentences_s']:.2f} vs reference)" if len(names) > 1 and name == names[0] else ""
            lines.append(f"{name}: {res[name]['sentences_s']:.1f} sentences/s{ratio}")
    _say(args, *lines)
    return {"target": args.target, "reference": ref_name, "kind": kind, "results": res, "versions": _versions()}


def cmd_info(args) -> dict:
    from collections import Counter
    from pathlib import Path

    from .io.checkpoint import read_manifest, tensor_bytes, verify_files

    manifest = read_manifest(args.dir)
    if args.verify:
        verify_files(args.dir, manifest)
    folder = Path(args.dir)
    tensors = tensor_bytes(manifest)
    file_bytes = sum(m["bytes"] for m in manifest["files"].values())
    formats = Counter(m["format"] for m in manifest["modules"].values())
    report = manifest.get("report") or {}
    lines = [
        f"{folder}: qruntime checkpoint v{manifest['format_version']} ({manifest['model_class']}), written by "
        + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()),
        f"base model: {manifest.get('base_model') or '-'}; recipe: {manifest.get('recipe') or '-'}",
        f"quantized modules: {sum(formats.values())} (" + ", ".join(f"{n} {f}" for f, n in formats.items()) + ")",
        f"tensors: {len(manifest['tensors'])}, {_fmt_bytes(tensors)}; tensor files {_fmt_bytes(file_bytes)} "
        f"({file_bytes / max(1, tensors):.4f}x the tensor bytes); tied: {manifest['tied'] or '-'}",
    ]
    if report:
        lines.append(
            f"compression: {report.get('weight_compression', 0):.2f}x on {len(report.get('layers', []))} layers, "
            f"{len(report.get('skipped', []))} skipped; stages: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in (report.get("stages") or {}).items())
        )
    if args.verify:
        lines.append("checksums: OK (" + ", ".join(manifest["files"]) + ")")
    _say(args, *lines)
    return {"dir": str(folder), "tensor_bytes": tensors, "file_bytes": file_bytes,
            "verified": bool(args.verify), "manifest": manifest}


def cmd_export(args) -> dict:
    from .io.export import export_compressed_tensors
    from .eval.models import load_model

    model, tokenizer, _ = load_model(args.dir)
    summary = export_compressed_tensors(model, args.out, tokenizer=tokenizer)
    groups = "; ".join(
        f"{g['format']} {g['weights']['num_bits']}-bit {g['weights']['strategy']}" for g in summary["config_groups"].values()
    )
    _say(args, f"wrote {args.out} (compressed-tensors: {groups}; ignored: {summary['ignore'] or '-'}"
         + (f"; embeddings written as float: {summary['embeddings_as_float']}" if summary["embeddings_as_float"] else "") + ")")
    return summary


def cmd_presets(args) -> dict:
    from .recipes.presets import PRESETS

    _say(args, *(f"{name:<20} {text}" for name, text in PRESETS.items()))
    return {"presets": PRESETS}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qruntime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--json", nargs="?", const="-", default=None, metavar="FILE",
                       help="JSON output: to FILE, or to stdout (human output then goes to stderr)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        return p

    demo = add("demo", "compress the default model and report size, accuracy and speed, side by side")
    demo.add_argument("--model", default="smollm2-135m", help="alias (smollm2-135m), local folder or HF name")
    demo.add_argument("--preset", default="w8a16-gptq-clip", help="w8a16-gptq-clip, w8a16, w4a16-g128-gptq-clip-awq, auto, ... (qruntime presets)")
    demo.add_argument("--calib-samples", type=int, default=16, help="calibration windows (of --window tokens)")
    demo.add_argument("--eval-tokens", type=int, default=16384, help="tokens of the Wikipedia eval split")
    demo.add_argument("--window", type=int, default=512, help="perplexity window (non-overlapping)")
    demo.add_argument("--speed-rounds", type=int, default=3,
                      help="rounds of the side-by-side prefill / decode timing (medians); 0: no timing")

    p = add("compress", "compress a model and save it as a qruntime checkpoint")
    p.add_argument("model", help="alias (smollm2-135m, minilm-l6), local folder or HF name")
    p.add_argument("--recipe", default="w8a16", help="a preset (qruntime presets), e.g. w4a16-g128-gptq")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--calib", default="wiki", help="calibration text: 'wiki' (the Wikipedia calibration split) or a UTF-8 text file")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (16: about 8x faster, a little less accurate)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--all-layers", action="store_true", help="list every layer in the report table")
    p.add_argument("--device", default=None,
                   help="run the calibration there (e.g. cuda), the model staying in CPU RAM: one block at a time")
    p.add_argument("--calib-precision", default="auto", choices=["auto", "model", "bfloat16"],  # CALIB_PRECISIONS
                   help="matmul precision of the calibration forwards of a float32 model: auto = bfloat16 where the "
                        "hardware multiplies it natively (AVX512_BF16/AMX CPUs, CUDA), model = float32")
    p.add_argument("--train-text", default="wiki",
                   help="depth stage (d<N>+...) and 2:4 recovery (2:4-kd...): 'wiki' (the Wikipedia training split) or a "
                        "UTF-8 text file, best one like the text the model will see; a causal LM trains on "
                        "--train-samples windows of it, an encoder on its sentences (32 a batch, batched by length, shuffled)")
    p.add_argument("--train-samples", type=int, default=256,
                   help="depth stage / 2:4 recovery, causal LMs: training windows of --train-text, 4 per batch")
    p.add_argument("--train-seq-len", type=int, default=256, help="depth stage / 2:4 recovery, causal LMs: tokens per training window")
    p.add_argument("--distill-steps", type=int, default=100, help="depth stage / 2:4 recovery: optimizer steps")
    p.add_argument("--distill-minutes", type=float, default=None, help="depth stage / 2:4 recovery: cap on the training time")
    p.add_argument("--distill-lr", type=float, default=None,
                   help="depth stage / 2:4 recovery: peak learning rate (default: the recipe's, 1e-4; "
                        "docs/distillation.md: 3e-4 for SmolLM2, 5e-4 for MiniLM)")

    p = add("eval", "perplexity (causal LMs) and accuracy of a checkpoint or model")
    p.add_argument("target", help="checkpoint folder, alias, local folder or HF name")
    p.add_argument("--ppl", action="store_true", help="perplexity on the Wikipedia eval split (causal LMs)")
    p.add_argument("--acc", action="store_true",
                   help="next-token accuracy and agreement with the reference (causal LMs); linear-probe "
                        "accuracy on the movie-review sentences and embedding cosine (encoders)")
    p.add_argument("--tasks", action="store_true",
                   help="encoders: also a sentiment probe on 4,000 movie-review sentences, a topic probe on 200 "
                        "Usenet posts and the correlation with human similarity ratings of Lee news "
                        "(qruntime.eval.evaluate.evaluate_encoder_tasks; about a minute for MiniLM)")
    p.add_argument("--reference", default=None, help="model to compare with; default: a checkpoint's base model; 'none' for no comparison")
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--window", type=int, default=512)

    p = add("bench", "prefill/decode tokens/s (causal LMs) or sentences/s (encoders), vs the reference, interleaved")
    p.add_argument("target", help="checkpoint folder, alias, local folder or HF name")
    p.add_argument("--reference", default=None, help="model measured side by side; default: a checkpoint's base model; 'none'")
    p.add_argument("--prefill", type=int, default=256, help="prefill tokens")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    p.add_argument("--decode", type=int, default=32, help="greedy decode steps")
    p.add_argument("--decoder", choices=["auto", "qruntime", "hf"], default="auto",
                   help="causal LMs: run by the qruntime decoder where it reads the model (auto: else the model's own "
                        "forward, with the reason), only by it (qruntime), or by the model's own forward (hf)")
    p.add_argument("--batch", type=int, default=64, help="sentences per encoder batch")
    p.add_argument("--rounds", type=int, default=3)

    p = add("info", "what a checkpoint holds (recipe, formats, bytes, versions)")
    p.add_argument("dir", help="checkpoint folder")
    p.add_argument("--verify", action="store_true", help="also check every tensor file's size and SHA-256")

    p = add("export", "write a qruntime checkpoint in the compressed-tensors format (transformers, vLLM)")
    p.add_argument("dir", help="qruntime checkpoint folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--format", default="compressed-tensors", choices=["compressed-tensors"])

    add("presets", "list the recipe names")
    return parser


_COMMANDS = {"compress": cmd_compress, "eval": cmd_eval, "bench": cmd_bench, "info": cmd_info, "export": cmd_export,
             "presets": cmd_presets}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for name in ("calib_samples", "seq_len", "eval_tokens", "window", "prefill", "prompt", "decode", "batch", "rounds"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"qruntime: error: --{name.replace('_', '-')}={value}: must be >= 1", file=sys.stderr)
            return 2
    if getattr(args, "distill_lr", None) is not None and not args.distill_lr > 0:
        print(f"qruntime: error: --distill-lr={args.distill_lr}: must be > 0", file=sys.stderr)
        return 2
    if getattr(args, "speed_rounds", 0) < 0:
        print(f"qruntime: error: --speed-rounds={args.speed_rounds}: must be >= 0 (0: no timing)", file=sys.stderr)
        return 2
    try:
        with _library_bars_off() if args.quiet else contextlib.nullcontext():
            if args.command == "demo":
                run_demo(args.model, args.preset, args.eval_tokens, args.window, args.calib_samples, args.json,
                         quiet=args.quiet, speed_rounds=args.speed_rounds)
            else:
                _emit_json(args.json, _COMMANDS[args.command](args))
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        if os.environ.get("QRUNTIME_DEBUG"):
            raise
        print(f"qruntime: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a command line reports, it does not dump a traceback
        if os.environ.get("QRUNTIME_DEBUG"):
            raise
        print(f"qruntime: error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _library_bars_off():
    """``--quiet``: transformers' and huggingface_hub's own bars (loading / writing weights) off too, each
    library's setting as it was afterwards."""
    try:
        from huggingface_hub import utils as hub
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    hf_on, hub_off = hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if hf_on:
            hf_logging.enable_progress_bar()  # turns the hub's on too
        (hub.disable_progress_bars if hub_off else hub.enable_progress_bars)()


if __name__ == "__main__":
    sys.exit(main())
