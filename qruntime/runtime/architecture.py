"""What the decoder needs to know of a model, read from its Hugging Face modules, or a clear refusal.

Two families of causal LM are read:
  * Llama-style (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``phi3``, ``gemma``, ``starcoder2``): a norm
    before attention and MLP (RMSNorm; Gemma's 1 + weight; StarCoder2's LayerNorm), rotary positions
    (rotate-half over the whole head, any static rope type), grouped-query attention, a gated MLP (SiLU
    or tanh-GELU; StarCoder2: a plain GELU MLP); q/k/v and gate/up as separate or fused projections
    (Phi-3); per-head q/k RMSNorms (Qwen3);
  * GPT-2 (``gpt2``): LayerNorm, learned positions, multi-head attention, a GELU MLP, ``Conv1D``
    projections (or the QuantLinear that replaced them).
Anything else, or a variant of these the decoder does not compute (another activation, per-head q/k
norms, a rope type that changes with the length, ...), raises :class:`UnsupportedModelError` naming what
is missing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qruntime.ops.decode import ACT_GELU, ACT_GELU_TANH, ACT_GELU_TANH_MUL, ACT_SILU_MUL

__all__ = ["UnsupportedModelError", "Norm", "Block", "Architecture", "read_architecture", "LLAMA_STYLE", "FAMILIES"]

LLAMA_STYLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "starcoder2")
FAMILIES = (*LLAMA_STYLE, "gpt2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # inv_freq and its scaling do not change with the length
GPT2_ACTS = {"gelu_new": ACT_GELU_TANH, "gelu_pytorch_tanh": ACT_GELU_TANH, "gelu": ACT_GELU}
PLAIN_ACTS = GPT2_ACTS  # act(up(x)), then down
GATED_ACTS = {"silu": ACT_SILU_MUL, "gelu_pytorch_tanh": ACT_GELU_TANH_MUL}  # act(gate(x)) * up(x), then down


class UnsupportedModelError(ValueError):
    """The decoder does not compute this model (the message says what is missing)."""


@dataclass
class Norm:
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


@dataclass
class Block:
    norm1: Norm                 # before attention
    qkv: list[nn.Module]        # q, k, v projections, or one module that makes q | k | v
    o: nn.Module
    norm2: Norm                 # before the MLP
    up: list[nn.Module]         # gate, up (gated MLP), or the one up projection
    down: nn.Module
    qk_norm: tuple[Norm, Norm] | None = None  # per-head RMSNorms of q and k before rotary (Qwen3)


@dataclass
class Architecture:
    """A causal LM as the decoder runs it (float32 on the CPU)."""

    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int           # width of the activation's output (the down projection's input)
    norm: str                   # "rms" or "layer"
    act: int                    # qruntime.ops.decode.ACT_*
    scale: float                # attention logits scale
    embed: nn.Module
    positions: nn.Module | None  # learned position embeddings (GPT-2)
    blocks: list[Block]
    final_norm: Norm
    head: nn.Module
    rotary: tuple[torch.Tensor, float] | None = None  # (inv_freq [hd / 2], attention scaling)
    max_positions: int | None = None  # positions the model has (learned positions) or attends (sliding window)
    embed_scale: float = 1.0    # a factor the model's forward applies to the embeddings (Gemma, before 5.x)


def _norm(module: nn.Module, offset: float = 0.0) -> Norm:
    """A norm module's weight (+ ``offset``: Gemma's RMSNorm scales by 1 + weight), bias and eps."""
    eps = getattr(module, "variance_epsilon", None)
    eps = getattr(module, "eps", None) if eps is None else eps
    if eps is None:
        raise UnsupportedModelError(f"{type(module).__name__}: a norm without variance_epsilon / eps")
    weight = module.weight.detach().float()
    return Norm(weight + offset if offset else weight, getattr(module, "bias", None), float(eps))


def _check_runnable(model: nn.Module) -> None:
    if getattr(model, "config", None) is None:
        raise UnsupportedModelError(f"{type(model).__name__}: no Hugging Face config; the decoder reads HF causal LMs")
    bad = sorted({str(t.dtype) for t in [*model.parameters(), *model.buffers()]
                  if t.is_floating_point() and t.dtype != torch.float32})
    devices = sorted({str(t.device) for t in [*model.parameters(), *model.buffers()]})
    if devices != ["cpu"]:
        raise UnsupportedModelError(f"tensors on {devices}: the decoder runs on the CPU (model.to('cpu'))")
    if bad:
        raise UnsupportedModelError(f"float tensors in {bad}: the decoder runs float32 models (model.float())")
    if getattr(model, "_hf_hook", None) is not None or any(hasattr(m, "_hf_hook") for m in model.modules()):
        raise UnsupportedModelError("accelerate hooks (offloading or a device map): load the model whole on the CPU")


def _rope(inner: nn.Module, head_dim: int) -> tuple[torch.Tensor, float]:
    rope = inner.rotary_emb
    rope_type = getattr(rope, "rope_type", "default")
    if rope_type not in STATIC_ROPE:
        raise UnsupportedModelError(f"rope_type={rope_type!r}: the decoder takes rope types whose frequencies do "
                                    f"not change with the length ({', '.join(STATIC_ROPE)})")
    if 2 * rope.inv_freq.numel() != head_dim:
        raise UnsupportedModelError(f"partial rotary ({2 * rope.inv_freq.numel()} of head_dim={head_dim} dims): the "
                                    "decoder rotates whole heads")
    return rope.inv_freq.detach().float(), float(rope.attention_scaling)


def _activation(c, mlp: nn.Module) -> int:
    name = getattr(c, "hidden_activation", None) or getattr(c, "hidden_act", None)
    table = PLAIN_ACTS if hasattr(mlp, "c_fc") else GATED_ACTS
    if name not in table:
        kind = "plain" if table is PLAIN_ACTS else "gated"
        raise UnsupportedModelError(f"hidden_act={name!r}: the decoder's {kind} MLP computes {', '.join(table)}")
    return table[name]


def _llama(model: nn.Module) -> Architecture:
    """Llama-style decoders: pre-norm blocks with rotary attention (module names of Llama, Phi-3 and
    StarCoder2; Gemma's 1 + weight norms and scaled embeddings)."""
    c, inner = model.config, model.model
    attn0, mlp0 = inner.layers[0].self_attn, inner.layers[0].mlp
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    offset = 1.0 if c.model_type == "gemma" else 0.0
    blocks = [_llama_block(b, head_dim, offset) for b in inner.layers]
    window = getattr(c, "sliding_window", None)
    emb = inner.embed_tokens
    scales_itself = hasattr(emb, "scalar_embed_scale") or float(getattr(emb, "embed_scale", 1.0)) != 1.0
    return Architecture(
        family=c.model_type, hidden=c.hidden_size, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=c.intermediate_size, norm="layer" if isinstance(inner.norm, nn.LayerNorm) else "rms",
        act=_activation(c, mlp0), scale=float(getattr(attn0, "scaling", head_dim ** -0.5)), embed=emb,
        positions=None, blocks=blocks, final_norm=_norm(inner.norm, offset), head=model.lm_head,
        rotary=_rope(inner, head_dim), max_positions=window if isinstance(window, int) and window > 0 else None,
        embed_scale=c.hidden_size ** 0.5 if c.model_type == "gemma" and not scales_itself else 1.0)


def _llama_block(b: nn.Module, head_dim: int, offset: float) -> Block:
    attn, mlp = b.self_attn, b.mlp
    qkv = [attn.qkv_proj] if hasattr(attn, "qkv_proj") else [attn.q_proj, attn.k_proj, attn.v_proj]
    if hasattr(mlp, "c_fc"):  # StarCoder2: a plain MLP
        up, down = [mlp.c_fc], mlp.c_proj
    else:
        up, down = ([mlp.gate_up_proj] if hasattr(mlp, "gate_up_proj") else [mlp.gate_proj, mlp.up_proj]), mlp.down_proj
    qk_norm = None
    if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
        norms = (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None))
        if any(n is None or getattr(n, "weight", None) is None or n.weight.numel() != head_dim for n in norms):
            raise UnsupportedModelError("q/k norms that are not one RMSNorm per head on both q and k: not computed by "
                                        "the decoder")
        qk_norm = (_norm(norms[0]), _norm(norms[1]))
        if qk_norm[0].eps != qk_norm[1].eps:
            raise UnsupportedModelError(f"q/k norms with eps {qk_norm[0].eps} and {qk_norm[1].eps}: the decoder takes one eps")
    return Block(_norm(b.input_layernorm, offset), qkv, attn.o_proj, _norm(b.post_attention_layernorm, offset), up,
                 down, qk_norm)


def _gpt2(model: nn.Module) -> Architecture:
    c, t = model.config, model.transformer
    if c.activation_function not in GPT2_ACTS:
        raise UnsupportedModelError(f"activation_function={c.activation_function!r}: the decoder computes "
                                    f"{', '.join(GPT2_ACTS)}")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
        raise UnsupportedModelError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not computed by the decoder")
    head_dim = c.n_embd // c.n_head
    blocks = [Block(_norm(b.ln_1), [b.attn.c_attn], b.attn.c_proj, _norm(b.ln_2), [b.mlp.c_fc], b.mlp.c_proj)
              for b in t.h]
    return Architecture(
        family="gpt2", hidden=c.n_embd, heads=c.n_head, kv_heads=c.n_head, head_dim=head_dim,
        intermediate=c.n_inner or 4 * c.n_embd, norm="layer", act=GPT2_ACTS[c.activation_function],
        scale=head_dim ** -0.5 if c.scale_attn_weights else 1.0, embed=t.wte, positions=t.wpe, blocks=blocks,
        final_norm=_norm(t.ln_f), head=model.lm_head, rotary=None, max_positions=c.n_positions)


def read_architecture(model: nn.Module) -> Architecture:
    """The decoder's description of ``model`` (a Hugging Face causal LM on the CPU in float32).

    Raises:
        UnsupportedModelError: a family or variant the decoder does not compute, or a model it cannot run
            as it is (another dtype or device, offloading hooks); the message names it.
    """
    _check_runnable(model)
    family = getattr(model.config, "model_type", None)
    if family not in FAMILIES:
        raise UnsupportedModelError(f"model_type={family!r}: not a family the decoder computes; it reads "
                                    f"{', '.join(FAMILIES)}")
    try:
        arch = _llama(model) if family in LLAMA_STYLE else _gpt2(model)
    except AttributeError as exc:  # a model of the family with another module layout
        raise UnsupportedModelError(f"{type(model).__name__} ({family}): unexpected module layout ({exc})") from exc
    if arch.heads % arch.kv_heads:
        raise UnsupportedModelError(f"heads={arch.heads}, kv_heads={arch.kv_heads}: kv_heads must divide heads")
    return arch
