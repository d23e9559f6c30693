"""Sequential onloading (qruntime.plumbing.offload, compress(..., device=...)): a model kept in CPU RAM calibrated on
another device one block at a time. Here (no GPU) the execution device is the CPU itself: every move is a
no-op, but the hooks, the held block, the statistics' and layers' way home and the bookkeeping all run,
and must leave the results bit-identical. The CUDA test checks the memory bound on a real GPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from qruntime import compress
from qruntime.nn.modules import QuantLinear
from qruntime.plumbing.offload import Onloader, current_onloader, execution_device, home_device, onloaded



def _calib(vocab, n=8, seq=16):
    return [torch.randint(0, vocab, (1, seq)) for _ in range(n)]


def test_units_are_the_blocks_and_every_other_module_with_its_own_weights(tiny_llama):
    onloader = Onloader(tiny_llama, "cpu")
    names = {id(m): n for n, m in tiny_llama.named_modules()}
    units = [names[id(u)] for u in onloader.units]
    assert units[:2] == ["model.layers.0", "model.layers.1"]
    assert set(units[2:]) == {"model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head"}


def test_a_forward_pass_moves_each_unit_once_and_leaves_no_hook(tiny_llama):
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        expected = tiny_llama(x).logits
        hooks_before = {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in tiny_llama.named_modules()}
        with onloaded(tiny_llama, "cpu") as onloader:
            assert current_onloader(tiny_llama) is onloader and execution_device(tiny_llama) == torch.device("cpu")
            assert home_device(tiny_llama) == torch.device("cpu")
            out = tiny_llama(x).logits
            assert onloader.moves == len(onloader.units)
            with onloader.hold(tiny_llama.model.layers[0]):
                tiny_llama(x)
            # the held block moved once for the hold, not again for the pass
            assert onloader.moves == 2 * len(onloader.units)
            with pytest.raises(RuntimeError, match="already being onloaded"):
                with onloaded(tiny_llama, "cpu"):
                    pass
    assert torch.equal(out, expected)
    assert current_onloader(tiny_llama) is None
    assert hooks_before == {n: (len(m._forward_pre_hooks), len(m._forward_hooks)) for n, m in tiny_llama.named_modules()}


def test_onloaded_none_changes_nothing_and_errors_are_clear(tiny_llama):
    with onloaded(tiny_llama, None) as onloader:
        assert onloader is None and current_onloader(tiny_llama) is None
    with pytest.raises(ValueError, match="no parameters"):
        Onloader(nn.ReLU(), "cpu")
    meta = nn.Linear(4, 4, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        Onloader(meta, "cpu")


def test_a_bad_device_is_refused_before_any_work(tiny_llama):
    calib = _calib(128)
    with pytest.raises(ValueError, match="device='gpu0': not a torch device"):
        compress(tiny_llama, "w8a16-gptq", calib, progress=False, inplace=False, device="gpu0")
    with pytest.raises(ValueError, match="meta device"):
        compress(tiny_llama, "w8a16-gptq", calib, progress=False, inplace=False, device="meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            compress(tiny_llama, "w8a16-gptq", calib, progress=False, inplace=False, device="cuda")


def test_hooks_are_removed_when_the_pass_fails(tiny_llama):
    with pytest.raises(IndexError):
        with onloaded(tiny_llama, "cpu"):
            tiny_llama(torch.full((1, 4), 999))  # token ids beyond the vocabulary
    assert current_onloader(tiny_llama) is None
    assert all(not m._forward_pre_hooks for m in tiny_llama.modules())


def _packed(model):
    return {n: {k: v for k, v in m.state_dict().items()} for n, m in model.named_modules()
            if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("preset", ["w4a16-g32-gptq-clip-tune8-round-awq", "w8a16-gptq", "2:4-tune8",
                                    "w8a8-sq"])
@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_gpt2"])
def test_compress_with_a_device_gives_the_same_model(model_name, preset, request):
    """Block-by-block GPTQ with tuning and learned rounding, AWQ / SmoothQuant statistics, 2:4 with
    tuning: onloaded on the CPU, bit-identical to the plain run; the model keeps no hook."""
    model = request.getfixturevalue(model_name)
    calib = _calib(model.config.vocab_size)
    torch.manual_seed(1)
    plain, plain_report = compress(model, preset, calib, progress=False, inplace=False)
    torch.manual_seed(1)
    onl, report = compress(model, preset, calib, progress=False, inplace=False, device="cpu")
    assert report.calibration["device"] == "cpu" and "device" not in plain_report.calibration
    assert [r.rel_error for r in report.layers] == [r.rel_error for r in plain_report.layers]
    a, b = plain.state_dict(), onl.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert current_onloader(model) is None and all(not m._forward_pre_hooks for m in model.modules())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_a_model_in_cpu_ram_is_calibrated_on_the_gpu_one_block_at_a_time():
    """32 blocks (4 MB each) in CPU RAM; GPTQ + tuning with learned rounding on the GPU: the GPU's peak
    memory stays below half the model's size (what one block needs: its weights, GPTQ's float64 work, the
    tuning's codes, offsets and Adam state, the activations), the compressed model is in CPU RAM, and it
    is about as accurate as a CPU run's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=32, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    calib = _calib(cfg.vocab_size, n=8, seq=64)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    q, report = compress(model, "w4a16-g64-gptq-tune8-round", calib, progress=False, inplace=False, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.5 * model_bytes, (peak, model_bytes)
    assert all(t.device.type == "cpu" for t in q.state_dict().values())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert report.calibration["device"].startswith("cuda")
    cpu, _ = compress(model, "w4a16-g64-gptq-tune8-round", calib, progress=False, inplace=False)
    x = torch.randint(0, cfg.vocab_size, (1, 32))
    with torch.no_grad():
        ref, a, b = model(x).logits, q(x).logits, cpu(x).logits
    # different devices, different float sums: the two runs agree to about their own distance from float
    err_gpu = (a - ref).norm() / ref.norm()
    err_cpu = (b - ref).norm() / ref.norm()
    assert err_gpu < 1.5 * err_cpu + 1e-3


def test_recording_pass_leaves_the_passed_through_blocks_at_home(tiny_llama):
    """After the first batch the recording pass runs no block's compute, so no block visits the device:
    each extra batch moves only the units that really run before the blocks (embeddings, rotary tables)."""
    from qruntime.calibration.blockwise import blockwise_calibrate

    layers = {n: m for n, m in tiny_llama.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}
    moves = []
    for n in (2, 4):
        with onloaded(tiny_llama, "cpu") as onloader:
            blockwise_calibrate(tiny_llama, layers, _calib(128, n), lambda hs: None, progress=False)
            moves.append(onloader.moves)
    assert moves[1] - moves[0] == 2 * 2  # 2 more batches x (embed_tokens, rotary_emb); the blocks: 0
