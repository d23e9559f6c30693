"""Shared fixtures: tiny random-weight HF models built from configs (no download), tolerances."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter, on CPU tensors. Set before any kernel
# module is imported: @triton.jit reads it when it decorates.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Relative error bounds ||y - y_ref|| / ||y_ref|| against the float64 reference, per activation dtype.
# fp32: accumulation-order noise; fp16/bf16: the dequantized weight and the output are rounded to the
# dtype (2^-11, 2^-8 relative), plus accumulation.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    return (torch.linalg.vector_norm(y.to(torch.float64) - ref) / torch.linalg.vector_norm(ref)).item()


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
