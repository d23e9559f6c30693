"""GPTQ against round-to-nearest on the same grid: lower output error, codes on the grid, same format."""
from dataclasses import replace

import pytest
import torch
from torch import nn

from qruntime import QuantConfig, compress
from qruntime.calibration.stats import collect_hessians
from qruntime.eval.evaluate import sqnr_db
from qruntime.formats.packing import int4_params, int8_scales
from qruntime.quant.gptq import column_quantizer, gptq_quantize
from qruntime.quant.linear import quantize_linear


def _correlated_inputs(rows, k):
    # activations with a few strong, correlated channels, as in transformer layers
    base = torch.randn(rows, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k))
    base[:, : k // 8] *= 6
    return base


@pytest.mark.parametrize(
    "quant", [QuantConfig(bits=8), QuantConfig(bits=4, group_size=32), QuantConfig(bits=4, group_size=16, symmetric=True), QuantConfig(bits=4)]
)
def test_gptq_beats_rtn_on_output_error(quant):
    n, k = 48, 96
    linear = nn.Linear(k, n)
    x = _correlated_inputs(512, k)
    h = x.double().t() @ x.double()
    rtn = quantize_linear(linear, quant, hessian=h)  # method "rtn": the Hessian changes nothing
    assert torch.equal(rtn.qweight, quantize_linear(linear, quant).qweight)
    gptq = quantize_linear(linear, replace(quant, method="gptq"), hessian=h)
    with torch.no_grad():
        ref = linear(x)
        assert sqnr_db(ref, gptq(x)) > sqnr_db(ref, rtn(x)) + 0.5
    # same grid (scales, zero points) as round-to-nearest: only the codes differ
    assert torch.equal(rtn.scales, gptq.scales)
    assert (rtn.zeros is None and gptq.zeros is None) or torch.equal(rtn.zeros, gptq.zeros)


def test_gptq_output_is_on_the_grid():
    w = torch.randn(16, 64)
    scales, zeros, gs = int4_params(w, 16, False)
    x = torch.randn(200, 64)
    q = gptq_quantize(w, x.double().t() @ x.double(), column_quantizer(4, scales, zeros, gs))
    s = scales.double().t().repeat_interleave(gs, 1)
    z = zeros.double().t().repeat_interleave(gs, 1)
    codes = q / s + z
    assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.min() >= 0 and codes.max() <= 15
    s8 = int8_scales(w).double()[:, None]
    q8 = gptq_quantize(w, x.double().t() @ x.double(), column_quantizer(8, int8_scales(w), None, 64))
    assert torch.allclose(q8 / s8, (q8 / s8).round(), atol=1e-9) and (q8 / s8).abs().max() <= 127


def test_gptq_handles_dead_inputs_and_checks_shape():
    w = torch.randn(8, 32)
    x = torch.randn(100, 32)
    x[:, 5] = 0  # an input channel that never fires
    q = gptq_quantize(w, x.double().t() @ x.double(), column_quantizer(8, int8_scales(w), None, 32))
    assert torch.isfinite(q).all() and (q[:, 5] == 0).all()
    with pytest.raises(ValueError, match=r"hessian: shape \(31, 31\)"):
        gptq_quantize(w, torch.eye(31), column_quantizer(8, int8_scales(w), None, 32))


def test_collect_hessians_matches_explicit_sum():
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    batches = [torch.randn(3, 12), torch.randn(5, 12)]

    class Wrap(nn.Module):  # calibration batches are model inputs; this model takes a plain tensor
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, input_ids):
            return self.m(input_ids)

    wrap = Wrap()
    hs = collect_hessians(wrap, {"m.0": model[0], "m.2": model[2]}, [{"input_ids": b} for b in batches], progress=False)
    x = torch.cat(batches).double()
    h0, rows = hs["m.0"]
    assert rows == 8 and torch.allclose(h0, x.t() @ x / 8, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        x2 = torch.relu(model[0](torch.cat(batches))).double()
    assert torch.allclose(hs["m.2"][0], x2.t() @ x2 / 8, rtol=1e-5, atol=1e-6)
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_layers_sharing_an_input_share_its_product_and_others_do_not(tiny_llama):
    """q/k/v (and gate/up) read the same tensor: one X^T X per batch serves them all; every Hessian still
    equals the one computed from that layer's own recorded inputs, including layers whose input is a new
    tensor of the same shape (o_proj, down_proj)."""
    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and "layers." in n}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: seen[n].append(i[0].detach().reshape(-1, i[0].shape[-1]).double()))
               for n, m in layers.items()]
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    with torch.no_grad():
        for b in batches:
            tiny_llama(b)
    for h in handles:
        h.remove()
    hs = collect_hessians(tiny_llama, layers, batches, progress=False)
    for name in layers:
        x = torch.cat(seen[name])
        assert torch.allclose(hs[name][0], x.t() @ x / len(x), rtol=1e-5, atol=1e-6), name
    q, k = hs["model.layers.0.self_attn.q_proj"][0], hs["model.layers.0.self_attn.k_proj"][0]
    assert torch.equal(q, k)
    assert not torch.allclose(q, hs["model.layers.0.self_attn.o_proj"][0])


def test_compress_gptq_on_tiny_llama_beats_rtn(tiny_llama):
    import copy

    calib = [torch.randint(0, 128, (2, 32)) for _ in range(4)]
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        ref = tiny_llama(ids).logits
    rtn_model, _ = compress(tiny_llama, "w4a16-g32-rtn", inplace=False, progress=False)
    gptq_model, report = compress(copy.deepcopy(tiny_llama), "w4a16-g32-gptq", calib, progress=False)
    assert all(l.method.startswith("gptq (256 calibration rows)") for l in report.layers)
    with torch.no_grad():
        assert sqnr_db(ref, gptq_model(ids).logits) > sqnr_db(ref, rtn_model(ids).logits)


def test_gptq_needs_calibration_data_and_leaves_model_unchanged(tiny_gpt2):
    before = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    with pytest.raises(ValueError, match="needs calib_data"):
        compress(tiny_gpt2, "w8a16-gptq", progress=False)
    with pytest.raises(ValueError, match="no batches"):
        compress(tiny_gpt2, "w8a16-gptq", [], progress=False)
    with pytest.raises(TypeError, match="calibration batch of type str"):
        compress(tiny_gpt2, "w8a16-gptq", ["some text"], progress=False)
    after = tiny_gpt2.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(m._forward_hooks for m in tiny_gpt2.modules())


def test_layer_never_reached_falls_back_to_rtn_and_is_reported():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(16, 16)
            self.unused = nn.Linear(16, 16)

        def forward(self, input_ids):
            return self.used(input_ids)

    model, report = compress(Model(), "w8a16-gptq", [torch.randn(4, 16)], progress=False)
    methods = {l.name: l.method for l in report.layers}
    assert methods["used"].startswith("gptq") and "never reached" in methods["unused"]
    assert "fallback" in report.table() and "unused" in report.table()
