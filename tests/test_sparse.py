"""2:4 sparsity: the compressed format bit by bit, the op vs a float64 oracle, SparseLinear, the 2:4
recipes of compress() (report, skip, recovery) and save/load."""
from __future__ import annotations

import pytest
import torch

import qruntime
from qruntime.ops import registry as ops
from qruntime.quant.config import QuantConfig
from qruntime.recipes.config import SparsityConfig
from qruntime.recipes.presets import resolve_config
from qruntime.formats.packing import (
    dequantize_sp24,
    int4_params,
    nm_mask,
    pack_sp24,
    sp24_padded_k,
    unpack_int4,
    unpack_sp24,
)
from qruntime.nn.modules import SparseLinear
from qruntime.sparse.pack import pack_pruned

from conftest import REL_TOL, rel_error


def _sparse_weight(n: int, k: int, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(n, k) * (torch.rand(n, 1) + 0.5)
    return (w * nm_mask(torch.rand(n, k))).to(dtype)


def _oracle_dense(values, meta, k):
    """The dense weight decoded from docs/formats.md alone (byte c // 4, bits 2 (c % 4), column 4 (c // 2) + p)."""
    n, half = values.shape
    dense = torch.zeros(n, 2 * half, dtype=torch.float64)
    for c in range(half):
        p = (meta[:, c // 4].long() >> (2 * (c % 4))) & 3
        dense[torch.arange(n), 4 * (c // 2) + p] = values[:, c].double()
    return dense[:, :k]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [8, 36, 61, 200])
def test_pack_unpack_round_trip_and_bit_layout(dtype, k):
    w = _sparse_weight(7, k, dtype)
    values, meta = pack_sp24(w)
    kp = sp24_padded_k(k)
    assert kp % 8 == 0 and kp - 8 < k <= kp
    assert values.shape == (7, kp // 2) and values.dtype == dtype
    assert meta.shape == (7, kp // 8) and meta.dtype == torch.uint8
    assert torch.equal(unpack_sp24(values, meta, k), w)
    assert torch.equal(_oracle_dense(values, meta, k), w.double())
    # canonical: packing the unpacked weight gives the same bytes; positions increase within a group
    v2, m2 = pack_sp24(unpack_sp24(values, meta, k))
    assert torch.equal(v2, values) and torch.equal(m2, meta)
    pos = ((meta.long()[..., None] >> torch.tensor([0, 2, 4, 6])) & 3).reshape(7, -1, 2)
    assert (pos[..., 0] < pos[..., 1]).all()


def test_pack_of_groups_with_fewer_than_two_nonzeros():
    w = torch.zeros(2, 8)
    w[0, 3] = 5.0  # one nonzero: kept with the lowest free column
    values, meta = pack_sp24(w)
    assert values[0].tolist() == [0.0, 5.0, 0.0, 0.0]
    assert int(meta[0, 0]) & 0xF == 0 | (3 << 2)  # positions 0 and 3
    assert torch.equal(unpack_sp24(values, meta, 8), w)


def test_pack_refuses_a_dense_weight():
    with pytest.raises(ValueError, match="not 2:4 sparse: row 0, columns 0..3 hold 4"):
        pack_sp24(torch.ones(3, 8))
    with pytest.raises(ValueError, match="expected 2 dims"):
        pack_sp24(torch.ones(8))


def _module_oracle(m: SparseLinear, k: int) -> torch.Tensor:
    """Dequantized weight from the buffers and the docs: INT8 q * s[n]; INT4 (code - zero) * s over
    groups of g dense columns = g / 2 kept values."""
    if m.weight_format is None:
        kept = m.values.double()
    elif m.weight_format.bits == 8:
        kept = m.values.double() * m.scales.double()[:, None]
    else:
        codes = unpack_int4(m.values).double()
        g = torch.arange(codes.shape[1]) // (m.group_size // 2)
        z = 8.0 if m.zeros is None else m.zeros.double()[g].t()
        kept = (codes - z) * m.scales.double()[g].t()
    return _oracle_dense(kept, m.meta, k)


QUANTS = [None, QuantConfig(8), QuantConfig(4, None, True), QuantConfig(4, None, False),
          QuantConfig(4, 32, True), QuantConfig(4, 64, False), QuantConfig(4, 128, False)]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: "float" if q is None else q.name)
@pytest.mark.parametrize("k", [64, 100])
def test_sparse_linear_matches_the_oracle(quant, k):
    w = _sparse_weight(40, k)
    bias = torch.randn(40)
    m = pack_pruned(w, bias, quant)
    oracle = _module_oracle(m, k)
    dequantized = m.dequantized_weight().double()  # float32 products; the oracle's are float64
    assert torch.allclose(dequantized, oracle, rtol=1e-6, atol=0) and torch.equal(dequantized != 0, oracle != 0)
    assert not oracle[w == 0].any()  # pruned stays exactly zero
    if quant is not None:  # quantization error bounded by half a step of the kept values' grid
        rel = (torch.linalg.vector_norm(oracle - w.double()) / torch.linalg.vector_norm(w.double())).item()
        assert rel < (0.01 if quant.bits == 8 else 0.15)
    x = torch.randn(5, k)
    y = m(x)
    ref = x.double() @ oracle.T + bias.double()
    assert rel_error(y, ref) < 1e-5
    assert m.packed_bytes() < w.numel() * 4 * (0.6 if quant is None else 0.25)


@pytest.mark.parametrize("kind", ["float", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m_rows", [1, 17])
def test_op_vs_float64_oracle_and_opcheck(kind, dtype, m_rows):
    k, n = 76, 33
    quant = {"float": None, "int8": QuantConfig(8), "int4": QuantConfig(4, 32, False)}[kind]
    layer = pack_pruned(_sparse_weight(n, k), torch.randn(n), quant)
    x = torch.randn(m_rows, k).to(dtype)
    args = (layer.values, layer.meta, layer.scales, layer.zeros, layer.group_size, layer.bias)
    y = ops.sp24_linear(x, *args)
    assert y.dtype == dtype and y.shape == (m_rows, n)
    ref = x.double() @ _module_oracle(layer, k).T + layer.bias.double()
    assert rel_error(y, ref) < REL_TOL[dtype]
    torch.library.opcheck(ops.sp24_linear, (x, *args))


def test_op_gradient_flows_to_x_and_bias():
    layer = pack_pruned(_sparse_weight(12, 32), torch.randn(12), QuantConfig(8))
    x = torch.randn(3, 32, dtype=torch.float64, requires_grad=True)
    bias = layer.bias.detach().double().requires_grad_()
    torch.autograd.gradcheck(
        lambda x, b: ops.sp24_linear(x, layer.values, layer.meta, layer.scales, None, 0, b), (x, bias)
    )


def test_op_errors_name_the_values():
    layer = pack_pruned(_sparse_weight(8, 32), None, QuantConfig(4, 16, False))
    x = torch.randn(2, 32)
    v, meta, s, z = layer.values, layer.meta, layer.scales, layer.zeros
    with pytest.raises(ValueError, match=r"values: shape \(8, 4\), expected \(8, 8\)"):
        ops.sp24_linear(x, v[:, :4].contiguous(), meta, s, z, 16, None)
    with pytest.raises(ValueError, match="K=12 does not match"):  # K=20 would be fine: padded to 32 at g16
        ops.sp24_linear(torch.randn(2, 12), v, meta, s, z, 16, None)
    with pytest.raises(ValueError, match="group_size=24"):
        ops.sp24_linear(x, v, meta, s, z, 24, None)
    with pytest.raises(TypeError, match="meta: dtype torch.int8"):
        ops.sp24_linear(x, v, meta.to(torch.int8), s, z, 16, None)
    with pytest.raises(ValueError, match="only INT8/INT4 kept values have scales"):
        ops.sp24_linear(x, torch.randn(8, 16), meta, s, None, 0, None)
    with pytest.raises(ValueError, match=r"scales: shape \(1, 8\), expected \(2, 8\)"):
        ops.sp24_linear(x, v, meta, s[:1].contiguous(), None, 16, None)


def test_half_converts_float_values_not_scales():
    m = pack_pruned(_sparse_weight(8, 32), torch.randn(8), None)
    m.half()
    assert m.values.dtype == torch.float16 and m.bias.dtype == torch.float16
    q = pack_pruned(_sparse_weight(8, 32), torch.randn(8), QuantConfig(8)).to(torch.bfloat16)
    assert q.values.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert q(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- recipes ------------------------------------------------------------------------------------

def test_presets_and_their_errors():
    assert resolve_config("2:4").sparsity == SparsityConfig()
    assert resolve_config("2:4").quant is None
    c = resolve_config("2:4-wanda+w4a16-g128")
    assert c.sparsity.method == "wanda" and c.quant.group_size == 128 and c.name == "2:4-wanda+w4a16-g128-asym-gptq"
    assert resolve_config(c.name) == c  # the name parses back
    assert resolve_config("2:4-kd+w8a16").sparsity.recover is not None
    assert resolve_config("d1+2:4+w8a16").distill.num_layers == 1
    for bad, match in [("2:4+w8a8", "float activations"), ("4:8", "no kernels"), ("2:4+2:4", "weight recipe"),
                       ("2:4-random", "unknown preset")]:
        with pytest.raises(ValueError, match=match):
            resolve_config(bad)
    with pytest.raises(ValueError, match="multiple of 4"):
        SparsityConfig(block_size=6)
    with pytest.raises(ValueError, match="keeps every block"):
        SparsityConfig(recover=qruntime.DistillConfig(num_layers=2))


def _ids(n=4, t=24, vocab=128):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (1, t), generator=g) for _ in range(n)]


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama", "tiny_bert"])
@pytest.mark.parametrize("preset", ["2:4", "2:4-magnitude", "2:4+w8a16", "2:4-wanda+w4a16-g32-gptq",
                                    "2:4-tune4+w4a16-g32-gptq"])
def test_compress_2_4_recipes(arch, preset, request):
    model = request.getfixturevalue(arch)
    ids = _ids()
    with torch.no_grad():
        before = model(ids[0])[0]
    out, report = qruntime.compress(model, preset, calib_data=ids, inplace=False, progress=False)
    layers = [m for m in out.modules() if isinstance(m, SparseLinear)]
    assert layers and len(layers) == len(report.layers)
    for lr in report.layers:
        assert lr.format.startswith("2:4") and lr.sparsity >= 0.5 and lr.bytes_after < lr.bytes_before
        assert lr.method.split(" ")[0] == resolve_config(preset).sparsity.method
    for m in layers:
        w = m.dequantized_weight()
        assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    with torch.no_grad():
        after = out(ids[0])[0]
        assert torch.equal(model(ids[0])[0], before)  # inplace=False: the original is untouched
    assert torch.isfinite(after).all() and not torch.equal(after, before)
    assert report.weight_compression > (1.7 if "w" not in preset.split("+")[-1][:1] else 3.0)
    text = report.table()
    assert "zeros" in text and "50.0%" in text


def test_sparsegpt_model_is_closer_than_magnitude(tiny_llama):
    ids = _ids(8, 32)
    with torch.no_grad():
        ref = tiny_llama(ids[0]).logits
    errs = {}
    for preset in ("2:4-magnitude", "2:4"):
        out, _ = qruntime.compress(tiny_llama, preset, calib_data=ids[1:], inplace=False, progress=False)
        with torch.no_grad():
            errs[preset] = (out(ids[0]).logits - ref).norm().item()
    assert errs["2:4"] < errs["2:4-magnitude"], errs


def test_missing_data_and_skip_patterns(tiny_llama):
    with pytest.raises(ValueError, match="needs calib_data.*2:4-magnitude"):
        qruntime.compress(tiny_llama, "2:4", progress=False)
    with pytest.raises(ValueError, match="recovery stage and needs train_data"):
        qruntime.compress(tiny_llama, "2:4-magnitude-kd", progress=False)
    from qruntime.recipes.config import CompressConfig

    cfg = CompressConfig(quant=QuantConfig(8), sparsity=SparsityConfig(method="magnitude", skip=("*.o_proj",)))
    out, report = qruntime.compress(tiny_llama, cfg, inplace=False, progress=False)
    dense = [l for l in report.layers if l.name.endswith("o_proj")]
    assert dense and all(l.format == "w8a16" and l.sparsity is None and "skip pattern" in l.method for l in dense)
    assert type(out.get_submodule(dense[0].name)).__name__ == "QuantLinear"
    cfg = CompressConfig(quant=None, sparsity=SparsityConfig(method="magnitude", skip=("*.o_proj",)))
    _, report = qruntime.compress(tiny_llama, cfg, inplace=False, progress=False)
    assert not any(l.name.endswith("o_proj") for l in report.layers)
    assert any(s.name.endswith("o_proj") and "kept dense" in s.reason for s in report.skipped)


def test_recovery_keeps_the_masks_and_reduces_the_error(tiny_llama):
    from dataclasses import replace

    ids = _ids(8, 32)
    cfg = resolve_config("2:4-magnitude-kd")
    cfg = replace(cfg, sparsity=replace(cfg.sparsity, recover=qruntime.DistillConfig(steps=25, lr=3e-4, warmup_steps=2)))
    out, report = qruntime.compress(tiny_llama, cfg, train_data=ids[2:], eval_data=ids[:2], progress=False)
    rec = report.recovery
    assert rec["steps"] == 25 and rec["student_layers"] == rec["teacher_layers"] == 2
    assert rec["after"]["kl"] < rec["before"]["kl"]
    for m in out.modules():
        if isinstance(m, SparseLinear):
            w = m.dequantized_weight()
            assert int((w.reshape(w.shape[0], -1, 4) != 0).sum(-1).max()) <= 2
    assert "2:4 recovery (masks fixed)" in report.table()
    assert all(0 < l.rel_error < 1 for l in report.layers)  # measured against the original weights
    assert all(p.device.type == "cpu" for p in tiny_llama.parameters())  # the original is untouched
    assert all(type(m).__name__ != "SparseLinear" for m in tiny_llama.modules())


@pytest.mark.parametrize("preset", ["2:4-magnitude", "2:4-magnitude+w8a16", "2:4-magnitude+w4a16-g32-rtn"])
def test_save_load_round_trip_is_exact(preset, tiny_llama, tiny_gpt2, tmp_path):
    for i, model in enumerate((tiny_llama, tiny_gpt2)):
        out, report = qruntime.compress(model, preset, inplace=False, progress=False)
        qruntime.save(out, tmp_path / str(i), report=report)
        back = qruntime.load(tmp_path / str(i))
        ids = _ids(1)[0]
        with torch.no_grad():
            assert torch.equal(back(ids).logits, out(ids).logits)
        assert any(isinstance(m, SparseLinear) for m in back.modules())


def test_tampered_metadata_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    out, _ = qruntime.compress(tiny_llama, "2:4-magnitude", inplace=False, progress=False)
    qruntime.save(out, tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    key = next(k for k in state if k.endswith(".meta"))
    state[key] = torch.full_like(state[key], 0b01_01_01_01)  # positions 1, 1: not increasing
    save_file(state, f, metadata={"format": "pt"})
    with pytest.raises(qruntime.CheckpointError, match="not increasing"):
        qruntime.load(tmp_path, verify=False)


def test_int4_grid_is_that_of_the_pruned_weight():
    w = _sparse_weight(16, 64)
    m = pack_pruned(w, None, QuantConfig(4, 32, False))
    scales, zeros, _ = int4_params(w, 32, False)
    assert torch.equal(m.scales, scales) and torch.equal(m.zeros, zeros)
    assert torch.equal(dequantize_sp24(m.values, m.meta, m.scales, m.zeros, 32, 64), m.dequantized_weight())
