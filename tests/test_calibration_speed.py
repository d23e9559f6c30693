"""What makes block-by-block calibration fast, and must not change its results:

- the precision of the calibration forwards (compress(..., calib_precision=...),
  qruntime.calibration.stats.forward_dtype): bfloat16 matmuls under autocast for a float32 model where the
  hardware multiplies bf16 natively, the model's own dtype otherwise. The Hessians must stay close to the
  float32 ones, the hidden states carried between blocks must keep the model's dtype, and block tuning
  runs under the same autocast;
- the recording pass (qruntime.calibration.blockwise): after the first batch a pass-through stands in for each
  block, which must record exactly what running the blocks records."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qruntime import compress
from qruntime.calibration.stats import collect_hessians, collect_stats, forward_dtype
from qruntime.plumbing.model import find_blocks
from qruntime.calibration.blockwise import _output_form, _pass_through, blockwise_calibrate


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_forward_dtype_choices(monkeypatch):
    import importlib

    plumbing = importlib.import_module("qruntime.plumbing.model")

    model = nn.Linear(8, 4)
    assert forward_dtype(model, "model") is None
    assert forward_dtype(model, "bfloat16") is torch.bfloat16
    # a half-precision model already computes in its own dtype
    assert forward_dtype(copy.deepcopy(model).bfloat16(), "bfloat16") is None
    assert forward_dtype(copy.deepcopy(model).half(), "auto") is None
    monkeypatch.setattr(plumbing, "cpu_native_bf16", lambda: True)
    assert forward_dtype(model, "auto") is torch.bfloat16
    monkeypatch.setattr(plumbing, "cpu_native_bf16", lambda: False)
    assert forward_dtype(model, "auto") is None
    assert forward_dtype(model, "auto", torch.device("meta")) is None
    with pytest.raises(ValueError, match=r"calib_precision='fp8': must be one of \['auto', 'model', 'bfloat16'\]"):
        forward_dtype(model, "fp8")


def test_native_bf16_detection_agrees_with_torch():
    """/proc/cpuinfo's flags (what "auto" reads) and torch's own CPU probes agree on this machine."""
    from qruntime.plumbing.model import cpu_native_bf16

    assert cpu_native_bf16() == (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def test_bf16_hessians_are_close_to_the_float32_ones(tiny_llama):
    layers = _linears(tiny_llama)
    batches = [torch.randint(0, 128, (1, 16)) for _ in range(24)]
    exact = collect_hessians(tiny_llama, layers, batches, progress=False)
    fast = collect_stats(tiny_llama, layers, batches, progress=False, precision=torch.bfloat16)[0]
    assert sorted(fast) == sorted(exact)
    errors = {n: _rel(fast[n][0], exact[n][0]) for n in exact}
    assert max(errors.values()) < 2e-2, errors
    assert min(errors.values()) > 0, "the bf16 pass computed exactly what the float32 one did: autocast did not run"
    # block by block with nothing changed: the same products as one bf16 pass, summed in float32 (a bf16
    # running sum over 24 batches would be off by ~1e-3)
    seq = blockwise_calibrate(tiny_llama, layers, batches, lambda hs: None, progress=False, precision=torch.bfloat16)
    for name in exact:
        assert seq[name][1] == fast[name][1]
        assert _rel(seq[name][0], fast[name][0]) < 1e-6, name


@pytest.mark.parametrize("tune_targets", ["float", "block"])
def test_hidden_states_keep_the_model_dtype_and_tuning_runs_under_the_autocast(tiny_llama, tune_targets):
    layers = _linears(tiny_llama)
    batches = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    seen = []

    def tune(index, block, inputs, targets):
        seen.append((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
                     {h.dtype for h, _, _ in inputs}, {t.dtype for t in targets}))

    blockwise_calibrate(tiny_llama, layers, batches, lambda hs: None, progress=False, tune_block=tune,
                        tune_targets=tune_targets, precision=torch.bfloat16)
    assert seen == [(torch.bfloat16, {torch.float32}, {torch.float32})] * 2
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("recipe", ["w4a16-g32-gptq", "w4a16-g32-gptq-tune4-round", "2:4-sparsegpt"])
def test_compress_in_bf16_matches_float32_calibration(tiny_llama, recipe):
    """Same recipe, calibration forwards in float32 and in bf16: the report says which ran, and the
    compressed models are about equally far from the original on held-out text.

    One calibration set decides little: the two precisions round a few weights differently, and the
    ratio of the two errors moves by +-10% from set to set (0.93-1.13 over 12 sets, mean 1.03, for
    w4a16-g32-gptq). Over 8 sets the mean ratio moves by about +-0.02, so 1.1 is a margin of 3-4 of
    those, and still fails if bf16 calibration made the models systematically 10% worse."""
    errors = {"model": [], "bfloat16": []}
    for seed in range(8):
        torch.manual_seed(seed)
        calib = [torch.randint(0, 128, (1, 32)) for _ in range(8)]
        held_out = torch.randint(0, 128, (4, 32))
        with torch.no_grad():
            ref = tiny_llama(held_out).logits
        for precision in errors:
            model, report = compress(tiny_llama, recipe, calib, inplace=False, progress=False,
                                     calib_precision=precision)
            expected = {"model": "model", "bfloat16": "bfloat16 matmuls (autocast)"}[precision]
            assert report.calibration["precision"] == expected
            assert ("forwards in bfloat16 matmuls (autocast)" in report.table()) == (precision == "bfloat16")
            with torch.no_grad():
                errors[precision].append(_rel(model(held_out).logits, ref))
    ratios = [b / m for b, m in zip(errors["bfloat16"], errors["model"])]
    assert sum(ratios) / len(ratios) < 1.1, ratios


def test_round_to_nearest_records_no_precision(tiny_llama):
    _, report = compress(tiny_llama, "w8a16", inplace=False, progress=False, calib_precision="bfloat16")
    assert "precision" not in report.calibration


def _inner_calls(model):
    """Counts the calls of each block's first child with weights (e.g. its attention): a pass-through
    standing in for the block skips it."""
    from qruntime.plumbing.model import find_blocks

    counts = []
    for block in find_blocks(model).layers:
        child = next(c for c in block.children() if any(True for _ in c.parameters()))
        counts.append(0)
        child.register_forward_pre_hook(lambda m, a, i=len(counts) - 1: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2", "tiny_bert"])
def test_recording_skips_the_blocks_after_the_first_batch_and_records_the_same(arch, request):
    model = request.getfixturevalue(arch)
    inside = {id(m) for block in find_blocks(model).layers for m in block.modules()}
    layers = {n: m for n, m in model.named_modules() if id(m) in inside and type(m).__name__ in ("Linear", "Conv1D")}
    batches = [torch.randint(0, 128, (2, 12)) for _ in range(4)]
    dense = collect_hessians(model, layers, batches, progress=False)
    counts = _inner_calls(model)
    seq = blockwise_calibrate(model, layers, batches, lambda hs: None, progress=False)
    # per block: the first batch of the recording pass, then the Hessian pass and the output pass
    assert counts == [1 + 2 * len(batches)] * len(counts), counts
    assert sorted(seq) == sorted(dense)
    for name in dense:
        assert seq[name][1] == dense[name][1]
        assert torch.allclose(seq[name][0], dense[name][0], rtol=1e-4, atol=1e-6), name
    assert all("forward" not in b.__dict__ for b in find_blocks(model).layers)


def test_recording_runs_every_block_when_a_target_is_outside_them(tiny_llama):
    """The recording pass gives the Hessians of targets outside the blocks: it must then run them all."""
    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in layers
    # lm_head comes after the last block, where the recording stops: put a layer before the blocks
    tiny_llama.model.embed_tokens.register_forward_hook(lambda m, a, out: layers["probe"](out))
    layers["probe"] = nn.Linear(96, 96)
    del layers["lm_head"]
    batches = [torch.randint(0, 128, (1, 12)) for _ in range(3)]
    counts = _inner_calls(tiny_llama)
    seq = blockwise_calibrate(tiny_llama, layers, batches, lambda hs: None, progress=False)
    assert counts == [3 * len(batches)] * 2 and seq["probe"][1] == 3 * 12


def test_output_form():
    state = torch.zeros(2, 3, 4)
    assert _output_form(state, torch.ones(2, 3, 4)) == "tensor"
    assert _output_form(state, (torch.ones(2, 3, 4), None)) == (tuple, 2)
    assert _output_form(state, [torch.ones(2, 3, 4)]) == (list, 1)
    assert _output_form(state, (torch.ones(2, 3, 4), torch.ones(1))) is None  # e.g. a position bias passed on
    assert _output_form(state, torch.ones(2, 3, 5)) is None
    assert _output_form(state, ()) is None
    assert _output_form(None, torch.ones(1)) is None


def test_pass_through_restores_the_forwards_on_every_path():
    blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    wrapped = blocks[1].forward
    blocks[1].forward = wrapped  # an instance-level forward, as accelerate's hooks install
    x = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="boom"):
        with _pass_through(blocks, ["tensor", (tuple, 2)]):
            assert blocks[0](x) is x
            out = blocks[1](hidden_states=x)
            assert isinstance(out, tuple) and out[0] is x and out[1] is None
            raise RuntimeError("boom")
    assert "forward" not in blocks[0].__dict__ and blocks[1].__dict__["forward"] is wrapped
    assert not torch.equal(blocks[0](x), x)


def test_statistics_pass_skips_the_output_head_only_when_no_target_is_outside_the_blocks(tiny_llama):
    calls = []
    tiny_llama.lm_head.register_forward_pre_hook(lambda m, a: calls.append(1))
    batches = [torch.randint(0, 128, (1, 12)) for _ in range(3)]
    layers = _linears(tiny_llama)
    hessians, _ = collect_stats(tiny_llama, layers, batches, progress=False)
    assert calls == [] and sorted(hessians) == sorted(layers)
    assert all(rows == 3 * 12 for _, rows in hessians.values())
    with_head = dict(layers, lm_head=tiny_llama.lm_head)
    hessians, _ = collect_stats(tiny_llama, with_head, batches, progress=False)
    assert len(calls) == 3 and hessians["lm_head"][1] == 3 * 12
    # a model without a list of blocks runs whole
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    hessians, _ = collect_stats(seq, {"0": seq[0], "2": seq[2]}, [torch.randn(1, 5, 4)], progress=False)
    assert sorted(hessians) == ["0", "2"]


def test_cli_offers_every_precision():
    from qruntime.calibration.stats import CALIB_PRECISIONS
    from qruntime.cli import _parser

    for precision in CALIB_PRECISIONS:
        args = _parser().parse_args(["compress", "smollm2-135m", "--out", "x", "--calib-precision", precision])
        assert args.calib_precision == precision
    with pytest.raises(SystemExit):
        _parser().parse_args(["compress", "smollm2-135m", "--out", "x", "--calib-precision", "fp8"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_a_single_non_finite_activation_is_caught_from_the_product(bad, precision):
    """The Hessian hook checks the diagonal of X^T X, not X: one bad value anywhere must still be found."""
    from qruntime.plumbing.model import autocast
    from qruntime.calibration.blockwise import _hessian_hooks

    layer = nn.Linear(16, 4)
    sums, rows = {}, {}
    handles = _hessian_hooks({"layer": layer}, sums, rows)
    x = torch.randn(3, 7, 16)
    with autocast(torch.device("cpu"), precision):
        layer(x)
        x[2, 5, 11] = bad
        with pytest.raises(ValueError, match="non-finite activations at the input of layer 'layer'"):
            layer(x)
    for h in handles:
        h.remove()
    assert rows["layer"] == 21 and torch.isfinite(sums["layer"]).all()
