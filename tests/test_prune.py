"""N:M masks and the pruning methods: exact patterns, SparseGPT's error vs magnitude and Wanda."""
from __future__ import annotations

import pytest
import torch

from qruntime.formats.packing import check_nm, nm_mask
from qruntime.sparse.prune import prune_model, prune_weight, sparsegpt_prune, wanda_scores


def _groups_ok(w: torch.Tensor, n: int, m: int) -> bool:
    """Independent check: every group of m consecutive columns (last one short) has <= n nonzeros."""
    rows, k = w.shape
    for g0 in range(0, k, m):
        if int((w[:, g0:g0 + m] != 0).sum(dim=1).max()) > n:
            return False
    return True


def _real_like_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    """Correlated activations with a few outlier channels, like a transformer's Linear inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, torch.randperm(k, generator=g)[: max(1, k // 32)]] *= 20
    return x.double()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("k", [16, 37, 64])
def test_nm_mask_keeps_the_n_largest_of_every_group(n, m, k):
    scores = torch.rand(9, k) + 0.01
    mask = nm_mask(scores, n, m)
    assert mask.shape == (9, k) and mask.dtype == torch.bool
    assert _groups_ok(mask.int(), n, m)
    for g0 in range(0, k, m):
        cols = slice(g0, min(g0 + m, k))
        kept = min(n, cols.stop - cols.start)
        assert (mask[:, cols].sum(1) == kept).all()
        # every kept score is >= every dropped score of the group
        s, mk = scores[:, cols], mask[:, cols]
        lo = torch.where(mk, s, torch.inf).amin(1)
        hi = torch.where(~mk, s, -torch.inf).amax(1)
        assert (lo >= hi).all()


def test_nm_mask_ties_keep_the_lower_column_and_bad_args():
    assert nm_mask(torch.ones(1, 4)).tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.ones(2, 4), 4, 4)
    with pytest.raises(ValueError, match="2 dims"):
        nm_mask(torch.ones(4))


def test_check_nm_names_the_offending_group():
    w = torch.zeros(3, 8)
    w[1, 4:7] = 1.0
    with pytest.raises(ValueError, match=r"row 1, columns 4\.\.7 hold 3 nonzeros"):
        check_nm(w)
    check_nm(w, 3, 4)  # fine as 3:4


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("k", [64, 70])
def test_every_method_gives_exact_2_4(method, k):
    w = torch.randn(24, k)
    x = _real_like_inputs(256, k, 1)
    pruned, mask = prune_weight(w, method, x.T @ x / len(x))
    assert _groups_ok(pruned, 2, 4)
    assert torch.equal(pruned != 0, mask & (w != 0) if method != "sparsegpt" else pruned != 0)
    assert not pruned[~mask].any()
    assert int(mask.sum()) == 24 * (k // 4 * 2 + min(2, k % 4))
    if method != "sparsegpt":  # kept weights untouched
        assert torch.equal(pruned[mask], w.double()[mask])


def test_magnitude_needs_no_data_and_the_others_do():
    w = torch.randn(4, 8)
    prune_weight(w, "magnitude")
    for method in ("wanda", "sparsegpt"):
        with pytest.raises(ValueError, match="Hessian"):
            prune_weight(w, method)
    with pytest.raises(ValueError, match="must be one of"):
        prune_weight(w, "random")


def test_wanda_keeps_the_weights_of_large_inputs():
    w = torch.ones(2, 4) + torch.tensor([0.1, 0.2, 0.0, 0.0])  # magnitude would keep columns 0, 1
    h = torch.diag(torch.tensor([1.0, 1.0, 100.0, 100.0]))  # but columns 2, 3 see 10x larger inputs
    assert torch.allclose(wanda_scores(w, h)[0], torch.tensor([1.1, 1.2, 10.0, 10.0], dtype=torch.float64))
    _, mask = prune_weight(w, "wanda", h)
    assert mask.tolist() == [[False, False, True, True]] * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparsegpt_beats_magnitude_and_wanda_on_output_error(seed):
    torch.manual_seed(seed)
    k, n = 128, 48
    w = torch.randn(n, k).double()
    x = _real_like_inputs(1024, k, seed)
    h = x.T @ x / len(x)
    y = x @ w.T

    def err(pruned):
        return (torch.linalg.vector_norm(x @ pruned.T - y) / torch.linalg.vector_norm(y)).item()

    e = {m: err(prune_weight(w, m, h)[0]) for m in ("magnitude", "wanda", "sparsegpt")}
    assert e["sparsegpt"] < e["wanda"] <= e["magnitude"] * 1.001, e
    assert e["sparsegpt"] < 0.8 * e["magnitude"], e


def test_sparsegpt_lazy_blocks_do_not_change_the_result():
    k = 96
    w = torch.randn(20, k)
    x = _real_like_inputs(400, k, 3)
    h = x.T @ x
    a, ma = sparsegpt_prune(w, h, block_size=4)
    b, mb = sparsegpt_prune(w, h, block_size=128)
    c, mc = sparsegpt_prune(w, h, block_size=30)  # rounded down to 28: still whole groups
    assert torch.equal(ma, mb) and torch.equal(ma, mc)
    assert torch.allclose(a, b, atol=1e-9) and torch.allclose(a, c, atol=1e-9)


def test_sparsegpt_dead_inputs_and_errors():
    k = 16
    w = torch.randn(6, k)
    x = _real_like_inputs(64, k, 4)
    x[:, 5] = 0  # an input that is always zero: its weights do not matter
    pruned, mask = sparsegpt_prune(w, x.T @ x)
    assert not pruned[:, 5].any()
    assert _groups_ok(pruned, 2, 4)
    with pytest.raises(ValueError, match=r"expected \(16, 16\)"):
        sparsegpt_prune(w, torch.eye(8))
    with pytest.raises(ValueError, match="block_size=2"):
        sparsegpt_prune(w, torch.eye(k), block_size=2)


@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_prune_model_in_place_with_masks(arch, nm, request):
    model = request.getfixturevalue(arch)
    ids = [torch.randint(0, 128, (1, 24)) for _ in range(3)]
    masks, skipped = prune_model(model, "wanda", *nm, calib_data=ids, progress=False)
    params = dict(model.named_parameters())
    assert masks and all(name in params for name in masks)
    for name, mask in masks.items():
        w = params[name].detach()
        assert mask.shape == w.shape
        assert not w[mask == 0].any()
        dense_nk = w.t() if arch == "tiny_gpt2" else w  # Conv1D stores [K, N]
        assert _groups_ok(dense_nk, *nm)
    assert any("lm_head" in name for name, _ in skipped)
    with pytest.raises(ValueError, match="calib_data"):
        prune_model(model, "sparsegpt", progress=False)


# ---- block-by-block calibration (qruntime.calibration.blockwise) ----------------------------------------------

def _linears(model):
    from torch import nn

    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"}


def test_blockwise_hessians_equal_the_dense_ones_when_nothing_changes(tiny_llama):
    from qruntime.calibration.stats import collect_hessians
    from qruntime.calibration.blockwise import blockwise_calibrate

    layers = _linears(tiny_llama)
    batches = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    dense = collect_hessians(tiny_llama, layers, batches, progress=False)
    calls = []
    fp = {}
    seq = blockwise_calibrate(tiny_llama, layers, batches, lambda hs: calls.append(sorted(hs)), progress=False,
                              fingerprint=fp)
    assert sorted(seq) == sorted(dense) and len(calls) == 2
    assert calls[0] == sorted(n for n in layers if ".layers.0." in n)
    for name in dense:
        assert seq[name][1] == dense[name][1]
        assert torch.allclose(seq[name][0], dense[name][0], rtol=1e-4, atol=1e-6), name
    assert fp["batches"] == 3 and fp["mode"] == "block by block"


def test_blockwise_hessians_follow_the_compressed_blocks(tiny_llama):
    """Block 1's Hessians are those of the model whose block 0 is already pruned."""
    from qruntime.calibration.stats import collect_hessians
    from qruntime.calibration.blockwise import blockwise_calibrate

    layers = _linears(tiny_llama)
    batches = [torch.randint(0, 128, (1, 24)) for _ in range(3)]
    block0 = {n: m for n, m in layers.items() if ".layers.0." in n}

    def prune_block(hs):
        for name in hs:
            w = layers[name].weight
            w.mul_(nm_mask(w.abs()))

    block1 = {n: m.weight.detach().clone() for n, m in layers.items() if ".layers.1." in n}
    dense = collect_hessians(tiny_llama, layers, batches, progress=False)
    seq = blockwise_calibrate(tiny_llama, layers, batches, prune_block, progress=False)
    # both blocks are pruned now; with block 1 dense again, a plain pass sees what block 1 saw
    with torch.no_grad():
        for name, w in block1.items():
            layers[name].weight.copy_(w)
    ref = collect_hessians(tiny_llama, layers, batches, progress=False)
    for name in layers:
        if ".layers.1." in name:
            assert torch.allclose(seq[name][0], ref[name][0], rtol=1e-4, atol=1e-6), name
            assert not torch.allclose(seq[name][0], dense[name][0], rtol=1e-3, atol=1e-5), name
    assert all(_groups_ok(m.weight, 2, 4) for m in block0.values())


@pytest.mark.parametrize("tune_targets", ["block", "float"])
def test_blockwise_tuning_targets(tiny_llama, tune_targets):
    """"block": each block's float output on the inputs it sees in the compressed model; "float": the
    float model's own output of that block (the targets then do not depend on the earlier pruning)."""
    import copy

    from qruntime.plumbing.model import find_blocks
    from qruntime.calibration.blockwise import blockwise_calibrate

    dense = copy.deepcopy(tiny_llama)
    layers = _linears(tiny_llama)
    batches = [torch.randint(0, 128, (1, 24)) for _ in range(2)]
    float_out, got = {}, {}
    blocks = find_blocks(dense).layers
    def keep(i):
        return lambda module, args, out: float_out.setdefault(i, []).append(out[0] if isinstance(out, tuple) else out)

    hooks = [b.register_forward_hook(keep(i)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        for b in batches:
            dense(b)
    for h in hooks:
        h.remove()

    def prune_block(hs):
        for name in hs:
            w = layers[name].weight
            w.mul_(nm_mask(w.abs()))

    def tune(i, block, inputs, targets):
        got[i] = [t.clone() for t in targets]
        with torch.no_grad():  # the "block" targets: this block, not yet tuned, on the compressed model's inputs
            got[(i, "block")] = [block_out(block, h, a, k) for h, a, k in inputs]

    def block_out(block, h, args, kwargs):
        out = block(h, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    originals = {n: m.weight.detach().clone() for n, m in layers.items()}
    blockwise_calibrate(tiny_llama, layers, batches, prune_block, progress=False, tune_block=tune,
                        tune_targets=tune_targets)
    assert sorted(k for k in got if isinstance(k, int)) == [0, 1]
    for i in (0, 1):
        for t, f in zip(got[i], float_out[i]):
            same = torch.allclose(t, f, rtol=1e-4, atol=1e-5)
            # block 0 sees the same inputs either way; block 1's "block" targets follow the pruned block 0
            assert same == (tune_targets == "float" or i == 0), (i, tune_targets)
    # the tuning callback ran on the pruned block: its own output differs from the targets it was given
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(got[(1, "block")], got[1]))
    assert all(not torch.equal(layers[n].weight, originals[n]) for n in layers)
    with pytest.raises(ValueError, match="tune_targets='fp': must be 'block' or 'float'"):
        blockwise_calibrate(tiny_llama, layers, batches, prune_block, progress=False, tune_targets="fp")


def test_compress_restores_weights_and_falls_back_without_blocks(tiny_llama):
    import qruntime
    from torch import nn

    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    batches = [torch.randint(0, 128, (1, 16)) for _ in range(2)]
    _, report = qruntime.compress(tiny_llama, "2:4", batches, inplace=False, progress=False)
    assert report.calibration["mode"] == "block by block"
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())

    class Plain(nn.Module):  # no list of blocks: one pass over the dense model instead
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 8)

        def forward(self, input_ids):
            return self.b(torch.relu(self.a(input_ids.float())))

    _, report = qruntime.compress(Plain(), "2:4", [torch.randn(4, 16).long()], progress=False)
    assert report.calibration["mode"].startswith("one pass")
    assert all(l.sparsity >= 0.5 for l in report.layers)
