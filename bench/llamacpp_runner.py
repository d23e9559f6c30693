"""llama.cpp beside qruntime: quantize the model's own GGUF with llama-quantize, time it with llama-bench.

llama.cpp is not a dependency: point ``--llama-cpp`` (or ``$LLAMA_CPP_BIN``) at a folder holding
``llama-bench`` and ``llama-quantize``. It builds offline from the source vendored in the
``llama-cpp-python`` sdist on PyPI:

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp
    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-bench llama-quantize      # then --llama-cpp build/bin

``llama-bench -p P -n N`` times a P-token prefill and N generated tokens from an empty context, each in
its own run; qruntime's rows in the same file use the same P and N.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess

ENV = "LLAMA_CPP_BIN"


def find_bin(folder: str | None) -> pathlib.Path | None:
    """The llama.cpp bin folder (argument, else $LLAMA_CPP_BIN), or None when neither is given."""
    folder = folder or os.environ.get(ENV)
    if not folder:
        return None
    path = pathlib.Path(folder).expanduser()
    for tool in ("llama-bench", "llama-quantize"):
        if not (path / tool).is_file():
            raise FileNotFoundError(f"{path / tool}: not found (--llama-cpp must name llama.cpp's bin folder)")
    return path


def quantized(bin_dir: pathlib.Path, source: pathlib.Path, qtype: str, cache: pathlib.Path) -> pathlib.Path:
    """``source`` requantized to ``qtype`` (F32, Q8_0, Q4_0, ...) by llama-quantize, cached by name."""
    out = cache / f"{source.stem}.{qtype}.gguf"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        subprocess.run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(source), str(tmp), qtype],
                       check=True, capture_output=True, text=True)
        tmp.rename(out)
    return out


def bench(bin_dir: pathlib.Path, gguf: pathlib.Path, prefill: int, decode: int, threads: int,
          repack: bool = True) -> dict:
    """One llama-bench run: {"prefill_tok_s", "decode_tok_s"} (tokens/s of -p prefill and -n decode)."""
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", str(prefill), "-n", str(decode),
           "-t", str(threads), "-r", "1", "-o", "json", "--repack", "1" if repack else "0"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    result = {}
    for test in json.loads(out.stdout):
        key = "prefill_tok_s" if test["n_prompt"] > 0 else "decode_tok_s"
        result[key] = float(test["avg_ts"])
    return result
