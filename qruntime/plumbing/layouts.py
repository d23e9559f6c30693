"""Which module feeds which Linear layers inside a transformer block, per model family.

The module tree does not say where a norm's output goes: that is in each family's ``forward``. A scaling
fold (SmoothQuant, AWQ) divides a producer's output channels by s and multiplies the consumers' input
columns by s, which leaves the model unchanged only when the producer's output reaches the consumers
and nothing else (not the residual stream, not another Linear). Each layout below was read from the
``forward`` of the families it names (transformers 5.x) and is checked by ``tests/test_family_folds.py``
and ``tests/test_support_matrix.py``: the folded float model gives the same logits.

A block matches a layout by the modules it holds and the config flags that change its dataflow. A
block that holds norms but matches no layout, or holds extra weight-bearing modules a layout does not
know (they may read the same input), gets no fold and a reason.

Layouts (producer -> consumers):

- Llama family (llama, mistral, qwen2/3, granite, phi3, starcoder2, gemma): ``input_layernorm`` -> q/k/v
  (or Phi-3's fused ``qkv_proj``); ``post_attention_layernorm`` -> gate/up (Phi-3: ``gate_up_proj``;
  StarCoder2: ``c_fc``); ``up_proj`` -> ``down_proj`` (Phi-3: the second half of ``gate_up_proj``'s
  rows). Gemma 2/3 feed gate/up from ``pre_feedforward_layernorm``; their ``post_*`` norms feed the
  residual stream.
- MoE (Mixtral, Qwen2/3-MoE, OLMoE): ``input_layernorm`` -> q/k/v, and a shared expert's ``up_proj`` ->
  ``down_proj``; ``post_attention_layernorm`` also feeds the router and the fused experts: no fold.
- OLMo 2: norms after the sublayers, q/k/v read the residual stream: only ``up_proj`` -> ``down_proj``.
- GPT-2: ``ln_1`` -> ``attn.c_attn``; ``ln_2`` -> ``mlp.c_fc``.
- OPT (``do_layer_norm_before``): ``self_attn_layer_norm`` -> q/k/v; ``final_layer_norm`` -> ``fc1``.
  OPT-350m's post-norm blocks are refused.
- GPT-NeoX (sequential or parallel residual), Bloom (unless ``apply_residual_connection_post_layernorm``):
  ``input_layernorm`` -> ``query_key_value``; ``post_attention_layernorm`` -> ``dense_h_to_4h``.
- Falcon: two norms (``ln_attn`` / ``ln_mlp``, or ``input_layernorm`` / ``post_attention_layernorm``)
  feed attention and MLP; one shared ``input_layernorm`` (parallel block) feeds both
  ``query_key_value`` and ``dense_h_to_4h`` as one group.
- ModernBERT: ``attn_norm`` -> ``attn.Wqkv``; ``mlp_norm`` -> ``mlp.Wi``.
- Post-norm encoders (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2): the norm's output is also
  the residual stream; refused.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["Fold", "BlockLayout", "block_layout", "SECOND_HALF"]

SECOND_HALF = "second_half"  # a fused [gate; up] producer: only its second half of rows (up) feeds the consumer


@dataclass(frozen=True)
class Fold:
    producer: str  # child of the block: a norm, or a Linear whose output rows are divided
    consumers: tuple[str, ...]
    rows: str | None = None  # None: all of the producer's outputs; SECOND_HALF: its second half only


@dataclass(frozen=True)
class BlockLayout:
    family: str
    folds: tuple[Fold, ...]
    known: frozenset[str]  # every child path (dotted) the layout accounts for
    refusal: str | None = None  # why no fold of this block is valid
    unfolded: tuple[tuple[str, str], ...] = ()  # (child path prefix, why its Linears get no fold)


def _get(block: nn.Module, path: str) -> nn.Module | None:
    try:
        return block.get_submodule(path)
    except AttributeError:
        return None


def _has(block: nn.Module, *paths: str) -> bool:
    return all(_get(block, p) is not None for p in paths)


def _flag(block: nn.Module, config, name: str, default):
    """A dataflow flag: the block's own attribute first (OPT, Bloom keep one), else the model config's."""
    if hasattr(block, name):
        return getattr(block, name)
    return getattr(config, name, default) if config is not None else default


def _layout(family: str, folds: list[Fold], extra=(), refusal: str | None = None, unfolded=()) -> BlockLayout:
    known = {p for f in folds for p in (f.producer, *f.consumers)} | set(extra)
    return BlockLayout(family, tuple(folds), frozenset(known), refusal, tuple(unfolded))


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_EXTRA = ("self_attn.o_proj", "mlp.down_proj", "self_attn.q_norm", "self_attn.k_norm",
                "post_attention_layernorm", "post_feedforward_layernorm")


def _llama_like(block: nn.Module) -> BlockLayout | None:
    if _has(block, "input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "mlp.gate_up_proj"):
        return _layout("phi3", [Fold("input_layernorm", ("self_attn.qkv_proj",)),
                                Fold("post_attention_layernorm", ("mlp.gate_up_proj",)),
                                Fold("mlp.gate_up_proj", ("mlp.down_proj",), SECOND_HALF)], ["self_attn.o_proj"])
    if _has(block, "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "mlp.c_fc"):
        return _layout("starcoder2", [Fold("input_layernorm", _ATTN),
                                      Fold("post_attention_layernorm", ("mlp.c_fc",))],
                       ["self_attn.o_proj", "mlp.c_proj"])
    if not _has(block, "self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        return None
    up = Fold("mlp.up_proj", ("mlp.down_proj",))
    if _has(block, "input_layernorm", "pre_feedforward_layernorm"):  # Gemma 2/3 sandwich norms
        return _layout("gemma2", [Fold("input_layernorm", _ATTN),
                                  Fold("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")), up],
                       _LLAMA_EXTRA)
    if _has(block, "post_feedforward_layernorm") and not _has(block, "input_layernorm"):  # OLMo 2
        return _layout("olmo2", [up], _ATTN + ("mlp.gate_proj",) + _LLAMA_EXTRA)
    if _has(block, "input_layernorm", "post_attention_layernorm") and not _has(block, "post_feedforward_layernorm"):
        return _layout("llama", [Fold("input_layernorm", _ATTN),
                                 Fold("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")), up],
                       _LLAMA_EXTRA)
    return None


_MOE_MLP = ("post_attention_layernorm also feeds the MoE router and the fused experts, which are not Linear "
            "layers: no fold")


def _moe(block: nn.Module) -> BlockLayout | None:
    """Llama-style attention with a sparse MoE MLP (Mixtral, Qwen2/3-MoE, OLMoE): only the attention input
    folds (and a shared expert's up -> down); the router and the experts read post_attention_layernorm."""
    if not _has(block, "input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "mlp.experts"):
        return None
    folds = [Fold("input_layernorm", _ATTN)]
    if _has(block, "mlp.shared_expert.up_proj", "mlp.shared_expert.down_proj"):
        folds.append(Fold("mlp.shared_expert.up_proj", ("mlp.shared_expert.down_proj",)))
    return _layout("moe", folds, ["self_attn.o_proj", "mlp", "post_attention_layernorm"],
                   unfolded=[("mlp.", _MOE_MLP)])


def _gpt2(block: nn.Module) -> BlockLayout | None:
    if not _has(block, "ln_1", "ln_2", "attn.c_attn", "mlp.c_fc"):
        return None
    return _layout("gpt2", [Fold("ln_1", ("attn.c_attn",)), Fold("ln_2", ("mlp.c_fc",))],
                   ["attn.c_proj", "mlp.c_proj"])


def _opt(block: nn.Module, config) -> BlockLayout | None:
    if not _has(block, "self_attn_layer_norm", "final_layer_norm", "self_attn.q_proj", "fc1", "fc2"):
        return None
    folds = [Fold("self_attn_layer_norm", _ATTN), Fold("final_layer_norm", ("fc1",))]
    refusal = None
    if not _flag(block, config, "do_layer_norm_before", True):
        refusal = "post-norm OPT block (do_layer_norm_before=False): the norm's output is the residual stream"
    return _layout("opt", folds, ["self_attn.out_proj", "fc2"], refusal)


def _neox_bloom_falcon(block: nn.Module, config) -> BlockLayout | None:
    qkv = next((p for p in ("attention.query_key_value", "self_attention.query_key_value") if _has(block, p)), None)
    if qkv is None or not _has(block, "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"):
        return None
    extra = [qkv.rsplit(".", 1)[0] + ".dense", "mlp.dense_4h_to_h"]
    if _has(block, "ln_attn", "ln_mlp"):  # Falcon's new architecture, two norms
        return _layout("falcon", [Fold("ln_attn", (qkv,)), Fold("ln_mlp", ("mlp.dense_h_to_4h",))], extra)
    if not _has(block, "input_layernorm"):
        return None
    if not _has(block, "post_attention_layernorm"):  # Falcon's parallel block: one norm feeds both branches
        return _layout("falcon", [Fold("input_layernorm", (qkv, "mlp.dense_h_to_4h"))], extra)
    family = "gpt_neox" if qkv.startswith("attention.") else "bloom/falcon"
    folds = [Fold("input_layernorm", (qkv,)), Fold("post_attention_layernorm", ("mlp.dense_h_to_4h",))]
    refusal = None
    if _flag(block, config, "apply_residual_connection_post_layernorm", False):
        refusal = "apply_residual_connection_post_layernorm: the norm's output is also the residual stream"
    return _layout(family, folds, extra, refusal)


def _modernbert(block: nn.Module) -> BlockLayout | None:
    if not _has(block, "attn_norm", "mlp_norm", "attn.Wqkv", "mlp.Wi", "mlp.Wo"):
        return None
    return _layout("modernbert", [Fold("attn_norm", ("attn.Wqkv",)), Fold("mlp_norm", ("mlp.Wi",))],
                   ["attn.Wo", "mlp.Wo"])


_POST_NORM = "post-norm block: the norm's output is also the residual stream, a fold would change the model"


def _post_norm(block: nn.Module) -> BlockLayout | None:
    if _has(block, "attention.output.LayerNorm", "output.LayerNorm"):  # BERT, RoBERTa, XLM-R, ELECTRA, DeBERTa
        return _layout("bert", [], refusal=_POST_NORM)
    if _has(block, "sa_layer_norm", "output_layer_norm"):  # DistilBERT
        return _layout("distilbert", [], refusal=_POST_NORM)
    return None


def _strays(block: nn.Module, layout: BlockLayout) -> list[str]:
    """Weight-bearing modules of the block outside the layout: they may read a producer's output."""
    covered = set(layout.known)
    covered |= {p.rsplit(".", i)[0] for p in layout.known for i in range(1, p.count(".") + 1)}
    found = []
    for name, module in block.named_modules():
        if not name or name in covered or any(name.startswith(k + ".") for k in layout.known):
            continue
        if any(p.dim() >= 2 for p in module.parameters(recurse=False)):
            found.append(name)
    return found


def block_layout(block: nn.Module, config=None) -> BlockLayout | None:
    """The layout of ``block`` (see the module docstring), None for a module that is no known block. A
    block holding weight-bearing modules the layout does not account for is given the layout's family and
    a refusal naming them."""
    layout = (_llama_like(block) or _moe(block) or _gpt2(block) or _opt(block, config) or _neox_bloom_falcon(block, config)
              or _modernbert(block) or _post_norm(block))
    if layout is None or layout.refusal is not None:
        return layout
    strays = _strays(block, layout)
    if strays:
        return BlockLayout(layout.family, layout.folds, layout.known,
                           f"the block holds modules outside the known layout that may read this input: {strays}")
    return layout
