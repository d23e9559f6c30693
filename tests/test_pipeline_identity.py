"""compress() gives bit-identical results across refactors: packed tensors and report of a set of recipes.

`tests/data/pipeline_digests.json` holds, per (family, recipe), the SHA-256 of every tensor of the
compressed model's state dict and of the report's per-layer entries, written by

    python tests/test_pipeline_identity.py --write

on the code before a change that must not change results (with the environment it ran in). The test
recomputes them. Float results depend on the torch build and the CPU's kernels, so a digest file written
under another torch version or CPU kernel level is not comparable: there the test skips, saying so.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import support_matrix as sm  # noqa: E402

DIGESTS = Path(__file__).parent / "data" / "pipeline_digests.json"
FAMILIES = ["llama", "gpt2", "falcon (parallel, one norm)", "bert"]
RECIPES = [
    "w8a16", "w8a8", "w8a8-nosq", "w4a16-g32", "w8a16-gptq-clip", "w4a16-g32-rtn-clip-awq",
    "w4a16-g32-gptq-clip-tune-round-awq", "w8a8-sqauto", "2:4", "2:4+w4a16-g32", "2:4-tune",
    "w4a16-g32-rtn-emb8", "w4a16-g32-rtn-budget0.5", "d1+w8a16",
]


def _environment() -> dict:
    import qruntime

    return {"torch": torch.__version__, "cpu_backend": qruntime.cpu_backend()}


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


def _run(family: str, recipe: str) -> dict:
    """Digests of the compressed model's tensors and of the report's layer entries."""
    from qruntime.distill.config import DistillConfig
    from qruntime.recipes.config import CompressConfig
    from qruntime.recipes.presets import resolve_config

    model = sm.build(family)
    kwargs = {"calib_data": sm.calib(), "eval_data": sm.calib(2)}
    if recipe.startswith("d1+"):
        kwargs["train_data"] = [{"input_ids": b} for b in sm.calib(4)]
        base = resolve_config(recipe.split("+", 1)[1])
        recipe = CompressConfig(quant=base.quant, distill=DistillConfig(num_layers=1, steps=2))
    torch.manual_seed(0)
    q, report = sm.compress(family, model, recipe, **kwargs)
    layers = [(l.name, l.format, l.bytes_after, l.method, repr(l.rel_error), repr(l.output_rel_error))
              for l in report.layers]
    skipped = [(s.name, s.reason) for s in report.skipped]
    return {"tensors": {k: _tensor_digest(v) for k, v in q.state_dict().items()},
            "report": hashlib.sha256(json.dumps([layers, skipped]).encode()).hexdigest()}


def _key(family: str, recipe: str) -> str:
    return f"{family} | {recipe}"


def _stored() -> dict:
    data = json.loads(DIGESTS.read_text())
    here = _environment()
    if data["environment"] != here:
        pytest.skip(f"{DIGESTS.name} was written under {data['environment']}, this run is {here}: float "
                    "results are not comparable; rewrite it on the code before a change "
                    "(python tests/test_pipeline_identity.py --write)")
    return data["digests"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_compress_results_are_bit_identical_to_the_recorded_ones(family, recipe):
    expected = _stored()[_key(family, recipe)]
    got = _run(family, recipe)
    changed = sorted(k for k in expected["tensors"].keys() | got["tensors"].keys()
                     if expected["tensors"].get(k) != got["tensors"].get(k))
    assert not changed, f"{family}, {recipe}: {len(changed)} tensors differ, e.g. {changed[:5]}"
    assert got["report"] == expected["report"], f"{family}, {recipe}: the report's layer entries differ"


def main() -> None:
    digests = {}
    for family in FAMILIES:
        for recipe in RECIPES:
            digests[_key(family, recipe)] = _run(family, recipe)
            print(_key(family, recipe), flush=True)
    DIGESTS.parent.mkdir(exist_ok=True)
    DIGESTS.write_text(json.dumps({"environment": _environment(), "digests": digests}, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    main()
