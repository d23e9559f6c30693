"""Compressed models as files: ``qruntime.save`` / ``qruntime.load``.

A checkpoint is a folder (layout and fields in docs/formats.md, "Checkpoint"):

* ``model.safetensors``: every parameter and buffer of the model's state dict, packed weights as they
  are (int8 / uint8 codes, float32 scales, uint8 zero points); a tensor tied to another one (GPT-2's and
  Llama's ``lm_head.weight``) is stored once.
* ``qruntime.json``: the manifest: format version, versions of qruntime / torch / transformers, the model
  class, the recipe, each compressed module's format, the tied-tensor aliases, every tensor's dtype and
  shape, and each tensor file's byte size and SHA-256.
* ``config.json`` (+ ``generation_config.json``): the HF config of the base architecture, when the
  model is a ``transformers`` model; tokenizer files when a tokenizer is passed to :func:`save`.

:func:`load` verifies sizes and checksums before reading a tensor, builds the architecture with its
parameters on the meta device, swaps in empty :class:`~qruntime.nn.modules.QuantLinear`, ``QuantEmbedding`` and
``SparseLinear`` modules as the manifest says and assigns the stored tensors: no calibration, no quantization, outputs bit-identical to the saved
model. Nothing is unpickled, and only ``transformers`` classes are instantiated by name.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from qruntime.formats.packing import WeightFormat
from qruntime.version import versions

__all__ = ["save", "load", "read_manifest", "verify_files", "tensor_bytes", "CheckpointError", "FORMAT_VERSION",
           "sha256_of"]

FORMAT = "qruntime-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "qruntime.json"
WEIGHTS = "model.safetensors"
_CHUNK = 1 << 22


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: missing, truncated, modified or of another version."""


def sha256_of(path: Path) -> str:
    """The SHA-256 of a file, as hex (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quant_modules(model: nn.Module) -> dict[str, nn.Module]:
    from qruntime.nn.modules import QuantEmbedding, QuantLinear, SparseLinear

    kinds = (QuantLinear, QuantEmbedding, SparseLinear)
    return {name: m for name, m in model.named_modules() if isinstance(m, kinds)}


def _module_entry(module: nn.Module) -> dict:
    from qruntime.nn.modules import QuantEmbedding, SparseLinear

    if isinstance(module, SparseLinear):
        return {
            "type": "SparseLinear",
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "dtype": _dtype_name(module.bias.dtype if module.bias is not None else
                                 module.values.dtype if module.values.is_floating_point() else torch.float32),
            "format": module.format,
            "quant": dataclasses.asdict(module.weight_format) if module.weight_format is not None else None,
        }
    if isinstance(module, QuantEmbedding):
        return {
            "type": "QuantEmbedding",
            "num_embeddings": module.num_embeddings,
            "embedding_dim": module.embedding_dim,
            "padding_idx": module.padding_idx,
            "out_dtype": _dtype_name(module.out_dtype),
            "embed_scale": module.embed_scale,
            "format": module.weight_format.name,
            "quant": dataclasses.asdict(module.weight_format),
        }
    return {
        "type": type(module).__name__,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "bias": module.bias is not None,
        "bias_dtype": _dtype_name(module.bias.dtype) if module.bias is not None else None,
        "format": module.weight_format.name,
        "quant": dataclasses.asdict(module.weight_format),
    }


def dedupe_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Stores each tensor once: an identical view of an earlier entry becomes an alias of it."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device (not loaded); nothing to save")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory: a different view of a stored storage is copied
        t = t.to("cpu").contiguous() if ptr not in storages else t.to("cpu").clone()
        if t.numel():
            seen[key] = name
            storages.add(ptr)
        out[name] = t
    return out, aliases


def _nonpersistent_dtypes(model: nn.Module) -> dict[str, str]:
    out = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = _dtype_name(buf.dtype)
    return out


def _cast_nonpersistent(model: nn.Module, dtypes: dict[str, str]) -> None:
    for full, dtype_name in dtypes.items():
        owner, _, name = full.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        buf = module._buffers.get(name)
        dtype = getattr(torch, str(dtype_name), None)
        if buf is not None and isinstance(dtype, torch.dtype) and buf.is_floating_point() and dtype.is_floating_point:
            module._buffers[name] = buf.to(dtype)


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def write_safetensors(tensors: dict[str, torch.Tensor], file: Path, metadata: dict[str, str]) -> None:
    """Writes a safetensors file atomically (temporary name, then rename), readable like any other file."""
    from safetensors.torch import save_file

    tmp = file.with_name(file.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file owner-only
    os.replace(tmp, file)


def save_hf_files(model: nn.Module, folder: Path, tokenizer=None):
    """config.json and generation_config.json of a transformers model, and the tokenizer's files;
    returns the config (None for a model without one)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(folder)
        gen = getattr(model, "generation_config", None)
        if gen is not None and hasattr(gen, "save_pretrained"):
            gen.save_pretrained(folder)
    else:
        config = None
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return config


def save(
    model: nn.Module, path: str | os.PathLike, *, tokenizer=None, report=None, recipe=None, base_model: str | None = None
) -> Path:
    """Writes ``model`` (compressed or not) to the folder ``path`` (created if missing).

    Args:
        model: a model returned by :func:`qruntime.compress`, or any ``nn.Module``.
        path: the checkpoint folder; files of an earlier checkpoint there are replaced.
        tokenizer: saved beside the model when given (anything with ``save_pretrained``).
        report: the :class:`~qruntime.plumbing.report.CompressReport` of the compression, kept in the manifest.
        recipe: the recipe name or config used; taken from ``report`` when not given.
        base_model: where the uncompressed model comes from (an alias, folder or HF name), recorded so
            that ``qruntime eval`` can compare against it.

    Returns:
        The folder, as a ``Path``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path}: exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)

    tensors, aliases = dedupe_tensors(model.state_dict())
    write_safetensors(tensors, path / WEIGHTS, {"format": "pt", "producer": FORMAT})
    config = save_hf_files(model, path, tokenizer)

    if recipe is None and report is not None:
        recipe = report.config
    if dataclasses.is_dataclass(recipe):
        recipe = dataclasses.asdict(recipe)
    weights = path / WEIGHTS
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model_class": type(model).__name__,
        "model_module": type(model).__module__,
        "has_hf_config": (path / "config.json").exists() and config is not None,
        "base_model": base_model,
        "recipe": recipe,
        "modules": {name: _module_entry(m) for name, m in _quant_modules(model).items()},
        "tied": aliases,
        # buffers not in the state dict (e.g. rotary inv_freq) are recomputed on load, then cast to these
        "nonpersistent_buffers": _nonpersistent_dtypes(model),
        "tensors": {
            name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "file": WEIGHTS} for name, t in tensors.items()
        },
        "files": {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": sha256_of(weights)}},
        "report": report.to_dict() if report is not None else None,
    }
    _write_json(path / MANIFEST, manifest)
    return path


_REQUIRED = ("format", "format_version", "model_class", "model_module", "modules", "tied", "tensors", "files")


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed and checked ``qruntime.json`` of a checkpoint folder (no tensor file is read)."""
    folder = Path(path)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder (a qruntime checkpoint is a folder with {MANIFEST})")
    if not file.exists():
        raise CheckpointError(f"{folder}: no {MANIFEST}; not a qruntime checkpoint (save one with qruntime.save)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(manifest).__name__}")
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise CheckpointError(f"{file}: missing fields {missing}")
    if manifest["format"] != FORMAT:
        raise CheckpointError(f"{file}: format={manifest['format']!r}, expected {FORMAT!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointError(
            f"{file}: format_version={version!r}; this qruntime reads versions 1..{FORMAT_VERSION} "
            f"(written by qruntime {manifest.get('versions', {}).get('qruntime', '?')}; upgrade qruntime)"
        )
    return manifest


def tensor_bytes(manifest: dict) -> int:
    """Bytes of the tensors a manifest lists (what the tensor files hold, headers aside)."""
    return sum(
        torch.Size(meta["shape"]).numel() * getattr(torch, meta["dtype"]).itemsize for meta in manifest["tensors"].values()
    )


def verify_files(path: str | os.PathLike, manifest: dict | None = None) -> None:
    """Checks every tensor file's size and SHA-256 against the manifest; raises CheckpointError."""
    folder = Path(path)
    manifest = manifest if manifest is not None else read_manifest(folder)
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{folder / MANIFEST}: 'files' lists no tensor file")
    for name, meta in files.items():
        if Path(name).name != name:
            raise CheckpointError(f"{folder / MANIFEST}: file name {name!r} is not a plain file name")
        file = folder / name
        if not file.exists():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != meta.get("bytes"):
            raise CheckpointError(
                f"{file}: {size} bytes, the manifest says {meta.get('bytes')}: the file is truncated or was replaced"
            )
        digest = sha256_of(file)
        if digest != meta.get("sha256"):
            raise CheckpointError(
                f"{file}: SHA-256 {digest[:16]}... does not match the manifest's {str(meta.get('sha256'))[:16]}...: "
                "the file is corrupted or was modified"
            )


def _read_tensors(folder: Path, manifest: dict, device: torch.device) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for name in manifest["files"]:
        try:
            state.update(load_file(str(folder / name), device=str(device)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{folder / name}: unreadable safetensors file ({exc})") from None
    expected = manifest["tensors"]
    if set(state) != set(expected):
        extra, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        raise CheckpointError(f"{folder}: tensors differ from the manifest (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, t in state.items():
        meta = expected[name]
        if _dtype_name(t.dtype) != meta.get("dtype") or list(t.shape) != meta.get("shape"):
            raise CheckpointError(
                f"{folder}: tensor {name!r} is {_dtype_name(t.dtype)} {list(t.shape)}, the manifest says "
                f"{meta.get('dtype')} {meta.get('shape')}"
            )
    for alias, target in manifest["tied"].items():
        if target not in state:
            raise CheckpointError(f"{folder / MANIFEST}: tied tensor {alias!r} points to {target!r}, which is not stored")
        state[alias] = state[target]
    return state


def _build_hf_model(folder: Path, manifest: dict) -> nn.Module:
    import transformers
    from accelerate import init_empty_weights

    module, name = manifest["model_module"], manifest["model_class"]
    if not module.startswith("transformers.") or not manifest.get("has_hf_config"):
        raise CheckpointError(
            f"{folder}: the model is a {module}.{name}, not a transformers model with a config.json; "
            "pass the architecture yourself: qruntime.load(path, model=<an instance of it>)"
        )
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{folder}: transformers {transformers.__version__} has no model class {name!r}")
    config = transformers.AutoConfig.from_pretrained(folder)
    # parameters on the meta device (assigned below); buffers such as rotary inv_freq computed for real
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    return model


def _quant_skeleton(name: str, entry: dict) -> nn.Module:
    from qruntime.nn.modules import QuantEmbedding, QuantLinear, SparseLinear

    kind = entry.get("type") if isinstance(entry, dict) else entry
    if kind not in ("QuantLinear", "QuantEmbedding", "SparseLinear"):
        raise CheckpointError(f"module {name!r}: type {kind!r} is not known")
    try:
        if kind == "SparseLinear":
            quant = _weight_format(entry["quant"]) if entry["quant"] is not None else None
            return SparseLinear(entry["in_features"], entry["out_features"], quant, bias=entry["bias"],
                                dtype=getattr(torch, entry["dtype"]), device="meta")
        quant = _weight_format(entry["quant"])
        if kind == "QuantEmbedding":
            return QuantEmbedding(
                entry["num_embeddings"], entry["embedding_dim"], quant, entry["padding_idx"],
                getattr(torch, entry["out_dtype"]), device="meta", embed_scale=entry.get("embed_scale", 1.0),
            )
        dtype = getattr(torch, entry["bias_dtype"]) if entry["bias"] else torch.float32
        return QuantLinear(
            entry["in_features"], entry["out_features"], quant, bias=entry["bias"], dtype=dtype, device="meta"
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"module {name!r}: invalid entry {entry} ({exc})") from None


def _weight_format(fields: dict) -> WeightFormat:
    """The module's format from its manifest entry (files written before the format was split from the
    recipe also hold the recipe's fields, such as ``method``: not part of the format, ignored)."""
    return WeightFormat(**{f.name: fields[f.name] for f in dataclasses.fields(WeightFormat) if f.name in fields})


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(rows, columns) of a Linear-like or embedding module's weight as qruntime stores it ([N, K])."""
    from qruntime.nn.modules import QuantEmbedding, QuantLinear, SparseLinear, is_conv1d

    if isinstance(module, (QuantLinear, SparseLinear, nn.Linear)):
        return module.out_features, module.in_features
    if isinstance(module, (QuantEmbedding, nn.Embedding)):
        return module.num_embeddings, module.embedding_dim
    if is_conv1d(module):
        return module.weight.shape[1], module.weight.shape[0]
    return None


def _retie(model: nn.Module, tied: dict[str, str]) -> None:
    """Tied parameters become one Parameter again (load_state_dict(assign=True) wraps each separately)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for alias, target in tied.items():
        if alias in params and target in params:
            owner, _, leaf = alias.rpartition(".")
            model.get_submodule(owner).register_parameter(leaf, params[target])


def _check_values(name: str, module: nn.Module) -> None:
    meta = getattr(module, "meta", None)
    if meta is not None:  # 2:4: the two positions of every group strictly increasing
        pos = (meta.to(torch.int64)[..., None] >> torch.tensor([0, 2, 4, 6], device=meta.device)) & 3
        pos = pos.reshape(meta.shape[0], -1, 2)
        if not bool((pos[..., 0] < pos[..., 1]).all()):
            raise CheckpointError(f"module {name!r}: 2:4 metadata has a group whose two positions are not increasing")
        if module.values.is_floating_point() and not bool(torch.isfinite(module.values).all()):
            raise CheckpointError(f"module {name!r}: 2:4 values hold NaN/Inf")
    scales = module.scales
    if scales is None:
        return
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise CheckpointError(f"module {name!r}: scales must be finite and > 0")
    if module.zeros is not None and module.zeros.numel() and int(module.zeros.max()) > 15:
        raise CheckpointError(f"module {name!r}: zero points must be 0..15, found {int(module.zeros.max())}")


def load(
    path: str | os.PathLike, *, model: nn.Module | None = None, device: str | torch.device = "cpu", verify: bool = True
) -> nn.Module:
    """Loads a checkpoint written by :func:`save`.

    Args:
        path: the checkpoint folder.
        model: the architecture, for models that are not ``transformers`` models (its Linear layers are
            replaced as the manifest says; its weights are overwritten). ``transformers`` models are
            rebuilt from ``config.json`` without it.
        device: where the tensors go (``"cpu"``, ``"cuda"``, ...); a checkpoint saved on any device loads
            on any other.
        verify: check each tensor file's size and SHA-256 first (a truncated or modified file raises
            :class:`CheckpointError` instead of giving a wrong model).

    Returns:
        The model in eval mode.
    """
    folder = Path(path)
    manifest = read_manifest(folder)
    if verify:
        verify_files(folder, manifest)
    device = torch.device(device)
    state = _read_tensors(folder, manifest, device)

    if model is None:
        model = _build_hf_model(folder, manifest)
    elif not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    modules = manifest["modules"]
    if not isinstance(modules, dict):
        raise CheckpointError(f"{folder / MANIFEST}: 'modules' must be an object")
    for name, entry in modules.items():
        try:
            original = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{folder}: module {name!r} does not exist in {type(model).__name__}") from None
        skeleton = _quant_skeleton(name, entry)
        want, have = _dims(original), _dims(skeleton)
        if want is not None and want != have:
            raise CheckpointError(
                f"{folder}: module {name!r} is {have} in the manifest, but the architecture's {type(original).__name__} "
                f"is {want}: the tensors do not fit it"
            )
        model.set_submodule(name, skeleton)

    skeleton = model.state_dict()
    for key, ref in skeleton.items():
        t = state.get(key)
        if t is None:
            continue
        if ref.is_floating_point() != t.is_floating_point() or (not ref.is_floating_point() and ref.dtype != t.dtype):
            raise CheckpointError(f"{folder}: tensor {key!r} is {t.dtype}, the architecture needs {ref.dtype}")
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{folder}: tensors do not fit {type(model).__name__}: {' '.join(first[:3])}") from None
    _retie(model, manifest["tied"])
    _cast_nonpersistent(model, manifest.get("nonpersistent_buffers") or {})
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{folder}: no stored value for {left[:5]}{' ...' if len(left) > 5 else ''}")
    model.to(device)
    for name in modules:
        _check_values(name, model.get_submodule(name))
    return model.eval()
