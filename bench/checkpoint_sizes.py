"""Checkpoint bytes per recipe: qruntime.save's files vs the fp16 safetensors of the same model, save /
load seconds, and whether the reloaded model's logits are bit-identical.

    python bench/checkpoint_sizes.py --model smollm2-135m --json bench/results/smollm2-135m_checkpoints.json

The fp16 reference is written for real (every float tensor in fp16, a tied head once), not estimated.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--preset", nargs="+",
                    default=["w8a16", "w8a8-nosq", "w4a16-g128-rtn", "w4a16-g64-rtn", "w8a16-emb8", "w4a16-g128-rtn-emb4",
                             "w4a16-g64-rtn-emb4"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from safetensors.torch import save_file

    from qruntime import compress, load, save
    from qruntime.io.checkpoint import dedupe_tensors, read_manifest, tensor_bytes
    from qruntime.eval.data import split_text
    from qruntime.eval.evaluate import tokenize_text
    from qruntime.eval.models import load_causal_lm

    model, tok = load_causal_lm(args.model)
    ids = tokenize_text(tok, split_text("eval"), max_tokens=128)[None, :]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tensors, _ = dedupe_tensors(model.state_dict())
        fp16 = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(fp16, os.path.join(tmp, "fp16.safetensors"))
        fp16_bytes = os.path.getsize(os.path.join(tmp, "fp16.safetensors"))
        print(f"# {args.model}: fp16 safetensors {fp16_bytes / 2**20:.1f} MiB")
        for preset in args.preset:
            qmodel, report = compress(model, preset, inplace=False, progress=False)
            folder = os.path.join(tmp, preset)
            t0 = time.perf_counter()
            save(qmodel, folder, report=report)
            t1 = time.perf_counter()
            loaded = load(folder)
            t2 = time.perf_counter()
            with torch.no_grad():
                identical = torch.equal(loaded(ids).logits, qmodel(ids).logits)
            manifest = read_manifest(folder)
            stored = tensor_bytes(manifest)
            file_bytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
            row = {"preset": report.config, "file_bytes": file_bytes, "tensor_bytes": stored,
                   "file_over_tensors": file_bytes / stored, "vs_fp16": file_bytes / fp16_bytes,
                   "save_s": t1 - t0, "load_s": t2 - t1, "logits_identical": identical}
            rows.append(row)
            print(f"{row['preset']:<26} {file_bytes / 2**20:8.1f} MiB  x{row['vs_fp16']:.3f} of fp16  "
                  f"file/tensors {row['file_over_tensors']:.4f}  save {row['save_s']:.2f} s  load {row['load_s']:.2f} s  "
                  f"identical logits: {identical}", flush=True)
    write_json(args.json, {"environment": environment(), "args": vars(args), "fp16_bytes": fp16_bytes, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
