"""Shared fixtures: tiny random-weight HF models built from configs (no download), tolerances."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Set before any kernel
# module is imported: @triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ---- nothing skipped silently --------------------------------------------------------------------------

SKIP_MISSING_ENV = "QRUNTIME_TEST_SKIP_MISSING"


def require(available: bool, what: str, *, allowed: str | None = None) -> None:
    """Stops a test (or, at module level, a test module) that needs an installed piece: the C++ extension,
    a test extra, an offline model package. scripts/install.sh installs every one of them, so a missing
    piece is a broken install and fails the run, never a skip that hides lost coverage.
    ``allowed``: a reason the piece may legitimately be absent here (then the test is skipped, saying so);
    QRUNTIME_TEST_SKIP_MISSING=1 turns every such failure into a skip, for a partial install."""
    if available:
        return
    if allowed is not None:
        pytest.skip(f"{what}: {allowed}", allow_module_level=True)
    if os.environ.get(SKIP_MISSING_ENV, "") not in ("", "0"):
        pytest.skip(f"{what} ({SKIP_MISSING_ENV} is set)", allow_module_level=True)
    pytest.fail(f"{what}: scripts/install.sh installs it (set {SKIP_MISSING_ENV}=1 to skip such tests)",
                pytrace=False)


def require_module(name: str, what: str, *, allowed: str | None = None):
    """The module ``name``, imported; missing: as :func:`require`."""
    import importlib
    import importlib.util

    require(importlib.util.find_spec(name) is not None, what, allowed=allowed)
    return importlib.import_module(name)


GPU_REASON = "needs an NVIDIA GPU"  # how every test that needs CUDA says why it is skipped without one


def pytest_collection_modifyitems(config, items):
    """Every test that needs an NVIDIA GPU (skipped without one, with the reason GPU_REASON) carries the
    ``gpu`` mark: scripts/gpu_check.sh runs ``pytest -m gpu`` and must reach all of them."""
    unmarked = [
        item.nodeid for item in items
        if item.get_closest_marker("gpu") is None
        and any(str(m.kwargs.get("reason", "")).startswith(GPU_REASON) for m in item.iter_markers("skipif"))
    ]
    if unmarked:
        raise pytest.UsageError("tests that need a GPU without the gpu mark: " + ", ".join(unmarked))


# Relative error bounds ||y - y_ref|| / ||y_ref|| against the float64 reference, per activation dtype.
# fp32: accumulation-order noise; fp16/bf16: the dequantized weight and the output are rounded to the
# dtype (2^-11, 2^-8 relative), plus accumulation.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def weight_only_tol(dtype: torch.dtype, m: int) -> float:
    """REL_TOL for a W8A16 / W4A16 result of ``m`` rows from the CPU kernels at the current ISA level:
    bf16's from ``ops.cpu_bf16_rows()`` rows on (bf16 products, as under autocast), else the dtype's."""
    from qruntime.ops import registry as ops

    rows = ops.cpu_bf16_rows()
    return REL_TOL[torch.bfloat16 if rows is not None and m >= rows else dtype]


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64).cpu()
    return (torch.linalg.vector_norm(y.to(torch.float64).cpu() - ref) / torch.linalg.vector_norm(ref)).item()


def scaled_error(y, oracle, x, w, bias=None) -> float:
    """||y - oracle|| / || |x| @ |w|^T + |bias| ||: the error bound of a rounded dot product, which holds
    when an output is a small difference of large terms (with N = 1 a plain relative error does not).
    x: the activations the op multiplies (W8A8: the dequantized per-token codes), w: dequantized [N, K]."""
    magnitude = x.cpu().double().abs() @ w.cpu().double().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.cpu().double().abs()
    diff = y.cpu().double() - oracle.cpu().double()
    return (torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(magnitude).clamp_min(1e-300)).item()


# float64 oracles of the ops, written from docs/formats.md (independent of qruntime.formats.packing' dequantize)
def w8a16_oracle(x, qweight, scales, bias):
    w = qweight.cpu().double() * scales.cpu().double()[:, None]
    y = x.cpu().double() @ w.t()
    return y if bias is None else y + bias.cpu().double()


def w4a16_oracle(x, qweight, scales, zeros, group_size, bias):
    from qruntime.formats.packing import unpack_int4

    k = x.shape[1]
    codes = unpack_int4(qweight.cpu()).double()[:, :k]
    g = torch.arange(k) // group_size
    z = 8.0 if zeros is None else zeros.cpu().double()[g].t()
    w = (codes - z) * scales.cpu().double()[g].t()
    y = x.cpu().double() @ w.t()
    return y if bias is None else y + bias.cpu().double()


def w8a8_activations(x):
    """The activations W8A8 multiplies: per-token codes times scales, float64 [M, K] (for scaled_error)."""
    from qruntime.ops import reference

    xq, a = reference.quantize_per_token(x.cpu())
    return xq.double() * a.double()[:, None]


def w8a8_oracle(x, qweight, scales, bias):
    from qruntime.ops import reference

    xq, a = reference.quantize_per_token(x.cpu())  # the op's definition: per-token INT8 in float32
    y = (xq.double() @ qweight.cpu().double().t()) * a.double()[:, None] * scales.cpu().double()
    return y if bias is None else y + bias.cpu().double()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=128, max_position_embeddings=64, num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()
