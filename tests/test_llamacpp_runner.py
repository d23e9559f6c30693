"""bench/llamacpp_runner.py against stand-in llama.cpp tools (llama.cpp itself is not a dependency):
the folder check, llama-quantize's command and cache, llama-bench's command and its JSON read back."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import stat

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("llamacpp_runner", ROOT / "bench" / "llamacpp_runner.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tool(path: pathlib.Path, body: str) -> None:
    path.write_text("#!/usr/bin/env bash\nset -eu\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def bin_dir(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    # llama-quantize --allow-requantize SRC DST TYPE: writes TYPE into DST, logs its arguments
    _tool(d / "llama-quantize", f'echo "$@" >> {d}/quantize.log\n[ "$1" = --allow-requantize ]\necho "$4" > "$3"\n')
    # llama-bench: logs its arguments, prints the JSON records of a pp and a tg test
    pp = {"n_prompt": 128, "n_gen": 0, "avg_ts": 812.5}
    tg = {"n_prompt": 0, "n_gen": 64, "avg_ts": 150.25}
    _tool(d / "llama-bench", f"echo \"$@\" >> {d}/bench.log\ncat <<'JSON'\n{json.dumps([pp, tg])}\nJSON\n")
    return d


def test_find_bin(runner, bin_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(runner.ENV, raising=False)
    assert runner.find_bin(None) is None
    assert runner.find_bin(str(bin_dir)) == bin_dir
    monkeypatch.setenv(runner.ENV, str(bin_dir))
    assert runner.find_bin(None) == bin_dir
    with pytest.raises(FileNotFoundError, match="llama-bench: not found"):
        runner.find_bin(str(tmp_path))


def test_quantize_once_then_cached(runner, bin_dir, tmp_path):
    source = tmp_path / "model.Q4_1.gguf"
    source.write_text("weights")
    out = runner.quantized(bin_dir, source, "Q8_0", tmp_path / "cache")
    assert out.name == "model.Q4_1.Q8_0.gguf" and out.read_text().strip() == "Q8_0"
    assert runner.quantized(bin_dir, source, "Q8_0", tmp_path / "cache") == out
    assert len((bin_dir / "quantize.log").read_text().splitlines()) == 1  # the second call reused the file


def test_bench_command_and_result(runner, bin_dir, tmp_path):
    result = runner.bench(bin_dir, tmp_path / "m.gguf", prefill=128, decode=64, threads=2, repack=False)
    assert result == {"prefill_tok_s": 812.5, "decode_tok_s": 150.25}
    args = (bin_dir / "bench.log").read_text().split()
    for flag, value in (("-p", "128"), ("-n", "64"), ("-t", "2"), ("-r", "1"), ("-o", "json"), ("--repack", "0")):
        assert args[args.index(flag) + 1] == value
