"""Memory of block-by-block calibration (issue 33: GPTQ calibration on Falcon ran away in memory).

Each model is compressed with ``w4a16-g128`` (GPTQ, block by block) in a subprocess under an address-space
limit (``RLIMIT_AS``), so a runaway fails fast instead of taking the machine; the subprocess reports its
peak resident memory over the call, which must stay within the bound documented in
:func:`qruntime.calibration.blockwise.blockwise_calibrate`, and the compressed model's logits must stay close to
the float model's. The sequences are long (1024 tokens) next to the width (64), so a recorded argument
of T x T per window (Falcon's materialized attention mask, with ALiBi [heads, T, T] float32: 16 MiB a
window, 64x the window's hidden states) kept once per window would exceed the bound several times over.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import qruntime
import support_matrix as sm
from qruntime.calibration.blockwise import _SharedArguments

MiB = 2**20
WINDOWS, TOKENS, VOCAB = 16, 1024, 128
# the child's address space may grow by the documented bound plus this (allocator arenas, thread stacks,
# lazily loaded kernels): generous for noise, far below a per-window leak (16 x 16 MiB for Falcon ALiBi)
ADDRESS_SLACK = 512 * MiB
# GPTQ against round-to-nearest on held-out tokens (relative logit error): GPTQ is calibrated on other
# random tokens, so it may lose a little; a broken calibration loses by far more
MAX_REL_ERROR, MAX_RATIO_TO_RTN = 0.5, 1.5

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
# name -> (model_type, config overrides)
MODELS = {
    "falcon": ("falcon", SMALL),
    "falcon-alibi": ("falcon", dict(SMALL, alibi=True)),
    "llama": ("llama", dict(SMALL, intermediate_size=256, num_key_value_heads=4)),
    "gpt_neox": ("gpt_neox", dict(SMALL, intermediate_size=256)),
    "bloom": ("bloom", dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)),
    "opt": ("opt", dict(SMALL, ffn_dim=256, word_embed_proj_dim=64)),
}
# and every other family of the support matrix, with its tiny config, at TOKENS positions
ENCODERS = set()
for _family, (_model_type, _overrides, _role) in sm.FAMILIES.items():
    if _model_type not in {model_type for model_type, _ in MODELS.values()}:
        # RoBERTa-style position ids start after the padding index: room for TOKENS of them
        _config = sm.BASE | _overrides | {"max_position_embeddings": TOKENS + 8}
        if _model_type == "gpt2":
            _config["n_positions"] = TOKENS
        MODELS[_model_type] = (_model_type, _config)
        if _role == "encoder":
            ENCODERS.add(_model_type)

# Runs in a fresh interpreter: argv[1] is a JSON spec; prints one JSON line of measurements.
CHILD = r"""
import json, resource, sys
spec = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (spec["start_limit"],) * 2)  # until the real limit is known
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
import qruntime
from qruntime.plumbing.model import find_blocks

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def rel(a, b):
    return ((a - b).norm() / b.norm()).item()

torch.manual_seed(0)
config = AutoConfig.for_model(spec["model_type"], **spec["config"])
model = (AutoModelForMaskedLM if spec["encoder"] else AutoModelForCausalLM).from_config(config).eval()
n, t, vocab = spec["windows"], spec["tokens"], spec["vocab"]
calib = [torch.randint(0, vocab, (1, t)) for _ in range(n)]
held_out = torch.randint(0, vocab, (2, t))
with torch.no_grad():
    reference = model(held_out).logits

def peak_of(run):
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident size (VmHWM)
    result = run()
    return status("VmHWM") - before, result

def tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from tensors(v)
    elif isinstance(value, dict):
        yield from tensors(list(value.values()))

blocks = find_blocks(model).layers
arguments = []  # what block 0 is called with besides its hidden states, for one window
hook = blocks[0].register_forward_pre_hook(lambda m, a, k: arguments.extend(tensors([a[1:], k])),
                                          with_kwargs=True)
with torch.no_grad():
    model(calib[0])  # warm-up, and the arguments
    hook.remove()
    forward, _ = peak_of(lambda: model(calib[0]))  # one window's transients: masks, attention scores, MLP
rtn, _ = qruntime.compress(model, "w4a16-g128-rtn", inplace=False, progress=False)
qruntime.compress(model, "w4a16-g128", calib[:1], inplace=False, progress=False)  # warm-up: lazy loads
with torch.no_grad():
    rtn_error = rel(rtn(held_out).logits, reference)
del rtn

# the bound of qruntime.calibration.blockwise.blockwise_calibrate, from this model's sizes
from qruntime.nn.modules import is_conv1d

def fan_ins(module):  # K of each Linear / GPT-2 Conv1D (weight [K, N]) under module
    return [m.weight.shape[0] if is_conv1d(m) else m.in_features for m in module.modules()
            if isinstance(m, torch.nn.Linear) or is_conv1d(m)]

fans = [k for b in blocks for k in fan_ins(b)]
terms = {
    "hidden states": n * t * config.hidden_size * 4,
    "one block's hessians": max(sum(k ** 2 * 8 for k in fan_ins(b)) for b in blocks),
    "hessian diagonals": sum(k * 8 for k in fans),
    "gptq workspace": 3 * max(fans) ** 2 * 8,
    "model weights": sum(p.numel() * p.element_size() for p in model.parameters()),
    "one window's block arguments": sum(a.numel() * a.element_size()
                                        for a in {id(a): a for a in arguments}.values()),
    "one window's forward": forward,
}
# the documented bound is the sum; 1.25x + 16 MiB for what the resident size counts beside the tensors
bound = 1.25 * sum(terms.values()) + 16 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + int(bound) + spec["address_slack"],) * 2)

peak, (compressed, report) = peak_of(lambda: qruntime.compress(model, "w4a16-g128", calib, inplace=False,
                                                              progress=False))
with torch.no_grad():
    error = rel(compressed(held_out).logits, reference)
print(json.dumps(dict(peak=peak, bound=bound, terms=terms, error=error, rtn_error=rtn_error,
                      mode=report.calibration.get("mode"))))
"""


def _run_child(model_type: str, config: dict) -> dict:
    spec = dict(model_type=model_type, config=config, encoder=model_type in ENCODERS, windows=WINDOWS, tokens=TOKENS, vocab=VOCAB,
                address_slack=ADDRESS_SLACK, start_limit=16 * 2**30)
    # glibc: blocks over 64 KiB mapped and unmapped one by one, few arenas: the resident size follows the
    # live tensors
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"{model_type}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets /proc/self's peak (Linux)")
@pytest.mark.parametrize("name", list(MODELS))
def test_blockwise_gptq_memory_stays_within_the_documented_bound(name):
    got = _run_child(*MODELS[name])
    terms = ", ".join(f"{k} {v / MiB:.1f}" for k, v in got["terms"].items())
    assert got["mode"] == "block by block", got["mode"]
    assert got["peak"] <= got["bound"], (
        f"{name}: peak resident memory grew by {got['peak'] / MiB:.1f} MiB during compress, over the bound "
        f"{got['bound'] / MiB:.1f} MiB (MiB: {terms})")
    assert got["error"] < MAX_REL_ERROR, f"{name}: relative logit error {got['error']:.3f}"
    assert got["error"] < MAX_RATIO_TO_RTN * got["rtn_error"], (
        f"{name}: GPTQ relative logit error {got['error']:.3f}, round-to-nearest {got['rtn_error']:.3f}")


def test_shared_arguments_keep_one_copy_of_equal_tensors_per_argument():
    shared = _SharedArguments()
    first = []
    for window in range(3):
        shared.new_forward()
        mask = torch.zeros(1, 4, 8, 8)
        cos, sin = torch.ones(1, 8, 2), torch.full((1, 8, 2), 0.5)  # one shape: must not be confused
        ids = torch.arange(8)[None] + (window == 2)  # differs in the last window
        calls = [(shared((), (b, "*args")),
                  {"attention_mask": shared(mask, (b, "attention_mask")),
                   "position_embeddings": shared((cos, sin), (b, "position_embeddings")),
                   "position_ids": shared(ids, (b, "position_ids"))})
                 for b in range(2)]
        kwargs = calls[0][1]
        assert calls[1][1]["attention_mask"] is kwargs["attention_mask"]  # both blocks: one tensor
        assert torch.equal(kwargs["position_embeddings"][0], cos)
        assert torch.equal(kwargs["position_embeddings"][1], sin)
        assert torch.equal(kwargs["position_ids"], ids)
        first.append(kwargs)
    assert first[1]["attention_mask"] is first[0]["attention_mask"]
    assert first[2]["attention_mask"] is first[0]["attention_mask"]
    assert first[1]["position_embeddings"][0] is first[0]["position_embeddings"][0]
    assert first[1]["position_embeddings"][1] is first[0]["position_embeddings"][1]
    assert first[1]["position_ids"] is first[0]["position_ids"]
    assert first[2]["position_ids"] is not first[0]["position_ids"]


def test_compress_holds_one_block_of_hessians_and_reports_the_same_errors(monkeypatch):
    """compress() keeps only the Hessian diagonals of the blocks it is done with (the full K x K of one block
    at a time), and measures each layer's output error on the full Hessian before dropping it: the report
    equals the one made with every Hessian kept."""
    import qruntime.calibration.blockwise as sequential

    model = sm.build("llama")
    real = sequential.blockwise_calibrate
    returned = []

    def spy(*args, keep, **kwargs):
        kwargs["keep_hessians"] = kwargs["keep_hessians"] if keep is None else keep
        result = real(*args, **kwargs)
        returned.append(result)
        return result

    reports = {}
    for keep in (None, True):
        monkeypatch.setattr(sequential, "blockwise_calibrate", lambda *a, keep=keep, **k: spy(*a, keep=keep, **k))
        _, reports[keep] = qruntime.compress(model, "w4a16-g32-gptq-clip-tune", sm.calib(), inplace=False,
                                            progress=False)
    kept_diagonals, kept_full = returned
    inside = [n for n in kept_full if ".layers." in n]
    assert inside and all(kept_diagonals[n][0].dim() == 1 and kept_full[n][0].dim() == 2 for n in inside)
    assert all(torch.equal(kept_diagonals[n][0], torch.diagonal(kept_full[n][0])) for n in inside)
    errors = {keep: [(l.name, l.output_rel_error, l.method) for l in r.layers] for keep, r in reports.items()}
    assert errors[None] == errors[True] and all(e is not None for _, e, _ in errors[None])
