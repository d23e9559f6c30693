"""Export to the ``compressed-tensors`` checkpoint format (HF transformers, vLLM).

``export_compressed_tensors(model, folder)`` writes ``config.json`` (the model's config plus a
``quantization_config`` with ``quant_method: compressed-tensors``) and ``model.safetensors``. Each
quantized Linear becomes (N = out_features, K = in_features; field names and packing as the
``compressed-tensors`` package defines them, see docs/formats.md "compressed-tensors export"):

* W8A8 (``int-quantized``): ``weight`` int8 [N, K], ``weight_scale`` float32 [N, 1]; activations are
  quantized per token at run time by the engine (``input_activations: dynamic, strategy token``).
* W8A16 and W4A16 (``pack-quantized``): ``weight_packed`` int32 [N, ceil(K * bits / 32)], codes
  ``q + 2^(bits-1)`` packed least significant first (column j of INT4 in bits 4 (j % 8) of word j // 8,
  which is exactly qruntime's nibble order); ``weight_scale`` float32 [N, G] (group) or [N, 1] (channel);
  ``weight_shape`` int64 [2]; asymmetric INT4 adds ``weight_zero_point`` int32 [ceil(N / 8), G], zero
  points ``z`` (qruntime's 0..15 = signed zp + 8) packed along N.

Scales stay float32, so the decompressed weights equal qruntime's dequantized weights bit for bit.
2:4 layers are stored dense with a ``sparsity_config`` (format ``dense``, structure ``2:4``); see
:func:`export_compressed_tensors`. Quantized embeddings (``-emb8`` / ``-emb4``) have no compressed-tensors form: they are written as float
tables (their dequantized values) and a head tied to them stays tied; the returned summary lists them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = ["export_compressed_tensors"]


def _pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8/int codes [R, C] (each < 2^bits) -> int32 [R, ceil(C * bits / 32)], least significant first."""
    per_word = 32 // bits
    rows, cols = codes.shape
    words = -(-cols // per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes.to(torch.int64)
    padded = padded.reshape(rows, words, per_word)
    out = torch.zeros(rows, words, dtype=torch.int64, device=codes.device)
    for i in range(per_word):
        out |= padded[..., i] << (bits * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _scheme(module) -> tuple:
    q = module.weight_format
    return (q.bits, q.group_size, q.symmetric, q.act_bits)


def _scheme_json(scheme: tuple) -> dict:
    bits, group, symmetric, act_bits = scheme
    fmt = "int-quantized" if act_bits == 8 else "pack-quantized"
    weights = {
        "num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
        "strategy": "group" if group is not None else "channel", "group_size": group,
    }
    acts = None
    if act_bits == 8:
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token", "group_size": None}
    return {"format": fmt, "weights": weights, "input_activations": acts, "output_activations": None}


def _linear_tensors(name: str, m) -> dict[str, torch.Tensor]:
    n, k = m.out_features, m.in_features
    out: dict[str, torch.Tensor] = {}
    if m.weight_format.bits == 8:
        scale = m.scales.detach().to(torch.float32).reshape(n, 1).contiguous()
        if m.weight_format.act_bits == 8:
            out[f"{name}.weight"] = m.qweight.detach().contiguous()
        else:
            codes = (m.qweight.detach().to(torch.int16) + 128).to(torch.uint8)
            out[f"{name}.weight_packed"] = _pack_int32(codes, 8)
            out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
    else:
        from qruntime.formats.packing import unpack_int4

        codes = unpack_int4(m.qweight.detach())[:, :k]
        out[f"{name}.weight_packed"] = _pack_int32(codes, 4)
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        scale = m.scales.detach().to(torch.float32).t().contiguous()  # [G, N] -> [N, G]
        if m.zeros is not None:
            out[f"{name}.weight_zero_point"] = _pack_int32(m.zeros.detach(), 4).t().contiguous()  # [ceil(N/8), G]
    out[f"{name}.weight_scale"] = scale
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().contiguous()
    return out


def _sparsity_config(sparse: dict, ignore: list[str]) -> dict:
    """compressed-tensors' sparsity section for 2:4 layers stored dense: format "dense", structure "2:4",
    the layers by name, and the fraction of zeros over them."""
    zeros = sum(int((m.dequantized_weight() == 0).sum()) for m in sparse.values())
    total = sum(m.out_features * m.in_features for m in sparse.values())
    return {
        "format": "dense",
        "sparsity_structure": "2:4",
        "global_sparsity": zeros / max(total, 1),
        "targets": sorted(sparse),
        "ignore": [n for n in ignore if n not in sparse],
    }


def _original_kinds(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The module type each quantized layer had in the base architecture (built on the meta device)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=True):
        base = type(model)(model.config)
    kinds = {}
    for name in names:
        try:
            kinds[name] = type(base.get_submodule(name)).__name__
        except AttributeError:
            kinds[name] = "?"
    return kinds


@dataclass
class _Layers:
    """The compressed layers of a model as the export writes them."""

    linears: dict[str, nn.Module]  # written as packed codes (2:4 quantized layers as their dense codes)
    sparse: dict[str, nn.Module]  # every 2:4 layer (for the sparsity config)
    sparse_float: dict[str, nn.Module]  # 2:4 layers with float kept values: written as float weights
    embeddings: dict[str, nn.Module]  # packed embeddings: written as float
    tied_heads: list[str]  # heads sharing a packed embedding: written with it


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, tokenizer=None) -> dict:
    """Writes ``model`` (from :func:`qruntime.compress` or :func:`qruntime.load`) as a compressed-tensors
    checkpoint folder that ``transformers`` and vLLM load.

    2:4 layers (``SparseLinear``) are written dense: quantized ones as their codes (pruned positions hold
    code 0 / the zero point), float ones as float weights (listed in ``ignore``), and the config's
    ``sparsity_config`` says ``format: dense, sparsity_structure: 2:4`` with their names.

    Raises:
        ValueError: the model is not a ``transformers`` model, has no quantized Linear, has GPT-2 style
            ``Conv1D`` layers (no compressed-tensors layout), or a grouped layer whose in_features is not a
            multiple of its group size (compressed-tensors and vLLM's kernels need whole groups; qruntime
            pads K instead): the error names the layers and the group sizes that would work.

    Returns:
        A summary: the folder, the config groups, the ignored layers, and the embeddings written as float.
    """
    from .checkpoint import dedupe_tensors, save_hf_files, write_safetensors

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(f"{type(model).__name__}: not a transformers model (no .config); compressed-tensors needs one")
    layers = _exported_layers(model)
    _check_exportable(model, layers)
    groups = _config_groups(layers.linears)
    formats = {g["format"] for g in groups.values()}
    tensors, _ = dedupe_tensors(_export_state(model, layers))
    ignore = sorted(
        n for n, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and n not in layers.linears
    ) + sorted(layers.tied_heads) + sorted(layers.sparse_float)
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_hf_files(model, folder, tokenizer)
    quantization_config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": _sparsity_config(layers.sparse, ignore) if layers.sparse else {},
        "transform_config": {},
    }
    cfg_file = folder / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["quantization_config"] = quantization_config
    cfg_file.write_text(json.dumps(cfg_json, indent=2) + "\n")
    write_safetensors(tensors, folder / "model.safetensors", {"format": "pt"})
    return {
        "folder": str(folder),
        "config_groups": groups,
        "ignore": ignore,
        "embeddings_as_float": sorted(layers.embeddings),
        "tensors": len(tensors),
    }


def _exported_layers(model: nn.Module) -> _Layers:
    """Sorts the compressed layers. 2:4 layers are written dense (compressed-tensors keeps a "dense"
    sparsity format that records the 2:4 structure for engines with sparse kernels): quantized ones as
    their dense codes, float ones as float weights."""
    from qruntime.nn.modules import QuantEmbedding, QuantLinear, SparseLinear

    sparse = {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}
    embeddings = {n: m for n, m in model.named_modules() if isinstance(m, QuantEmbedding)}
    shared = {id(m.qweight) for m in embeddings.values()}
    linears = {
        n: m for n, m in model.named_modules() if isinstance(m, QuantLinear) and id(m.qweight) not in shared
    }
    linears.update({n: m.dense_codes() for n, m in sparse.items() if m.weight_format is not None})
    return _Layers(
        linears=linears, sparse=sparse, embeddings=embeddings,
        sparse_float={n: m for n, m in sparse.items() if m.weight_format is None},
        tied_heads=[n for n, m in model.named_modules() if isinstance(m, QuantLinear) and id(m.qweight) in shared],
    )


def _check_exportable(model: nn.Module, layers: _Layers) -> None:
    """ValueError for what compressed-tensors cannot hold: no quantized Linear, GPT-2 Conv1D layers, ragged
    groups, or a head tied to a packed embedding in a config that does not tie them."""
    if not layers.linears:
        what = "only float 2:4 layers (no quantized Linear)" if layers.sparse_float else "no quantized Linear"
        raise ValueError(f"{type(model).__name__}: {what} to export; compress the model with a quantized recipe first")
    kinds = _original_kinds(model, list(layers.linears) + list(layers.sparse_float))
    conv1d = [n for n, kind in kinds.items() if kind == "Conv1D"]
    if conv1d:
        raise ValueError(
            f"{len(conv1d)} layers were transformers Conv1D ({conv1d[0]}, ...): compressed-tensors has no layout "
            "for them (GPT-2 family); save with qruntime.save instead"
        )
    ragged = [
        (n, m.in_features, m.weight_format.group_size)
        for n, m in layers.linears.items()
        if m.weight_format.group_size is not None and m.in_features % m.weight_format.group_size
    ]
    if ragged:
        n, k, g = ragged[0]
        fits = [s for s in (128, 64, 32, 16) if all(kk % s == 0 for _, kk, _ in ragged)]
        raise ValueError(
            f"{len(ragged)} layers have in_features not a multiple of their group size (e.g. {n}: K={k}, "
            f"group_size={g}); compressed-tensors needs whole groups. Compress with "
            + (f"group size {fits[0]}" if fits else "per-channel INT4") + " to export this model"
        )
    if layers.tied_heads and not getattr(model.config, "tie_word_embeddings", False):
        raise ValueError(f"{layers.tied_heads}: tied to a quantized embedding, but config.tie_word_embeddings is False")


def _config_groups(linears: dict[str, nn.Module]) -> dict[str, dict]:
    """One config group per packed format: targets "Linear" when there is one, else the layer names."""
    schemes: dict[tuple, list[str]] = {}
    for n, m in linears.items():
        schemes.setdefault(_scheme(m), []).append(n)
    groups = {}
    for i, (scheme, names) in enumerate(schemes.items()):
        targets = ["Linear"] if len(schemes) == 1 else sorted(names)
        groups[f"group_{i}"] = {"targets": targets, **_scheme_json(scheme)}
    return groups


def _export_state(model: nn.Module, layers: _Layers) -> dict[str, torch.Tensor]:
    """The tensors to write: the model's own, with each compressed layer's replaced by its export."""
    state = {}
    quantized = set(layers.linears) | set(layers.tied_heads) | set(layers.embeddings) | set(layers.sparse_float)
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner not in quantized:
            state[key] = t
    for n, m in layers.linears.items():
        state.update(_linear_tensors(n, m))
    for n, m in layers.sparse_float.items():
        state[f"{n}.weight"] = m.dequantized_weight().to(m.values.dtype)
        if m.bias is not None:
            state[f"{n}.bias"] = m.bias.detach()
    for n, m in layers.embeddings.items():
        state[f"{n}.weight"] = m.dequantized_weight().to(m.out_dtype)
    return state
