"""The Triton kernels compile for real NVIDIA GPUs, checked without one.

``python -m qruntime.kernels.aot`` compiles each kernel ahead of time to PTX and a cubin for sm_80
(A100) and sm_90 (H100/H200) with Triton's bundled ptxas, and checks the instructions: Tensor Core MMA on
fp16 / bf16 / int8 operands, IEEE division and round-half-even in the activation quantizer. It runs in a
subprocess because this test session runs the kernels in Triton's interpreter (TRITON_INTERPRET=1),
which replaces them by NumPy functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import require_module

require_module("triton", "Triton (the test extra) is not installed")


def _aot(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default, stated to silence its notice
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "qruntime.kernels.aot", "--json", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=1800)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc, rows


def test_every_kernel_path_compiles_for_ampere_and_hopper(tmp_path):
    proc, rows = _aot(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = {r["kernel"].split(" BM")[0] for r in rows}
    for name in ("w8a16 fp16 splitk", "w8a16 bf16 gemm", "w4a16 fp16 splitk g128 asym", "w4a16 bf16 gemm per-channel sym",
                 "quantize_per_token fp16", "w8a8 splitk", "w8a8 gemm",
                 "sp24 fp16 splitk float", "sp24 bf16 gemm int8", "sp24 fp16 gemm int4 g128 asym",
                 "sp24 bf16 splitk int4 per-channel sym", "sp24 dequant fp16 int4 g128 asym"):
        assert name in kernels, name
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert all(r["ok"] and r["instructions_ok"] for r in rows)


@pytest.mark.slow
def test_every_autotuning_config_compiles_for_hopper(tmp_path):
    """All configs of every tuned kernel: each compiles, and any over the shared-memory limit is one the
    pruner drops before launch."""
    proc, rows = _aot(tmp_path, "--all", "--arch", "90")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(rows) > 80
