"""The qruntime decoder (qruntime.runtime) against the model's own forward: per family it reads and per
weight format, the logits of prefill and of every decoding step, and greedy generation; the families and
variants it refuses, with the reason, and generate()'s stated fallback; its input checks."""
import copy
import math
import warnings

import pytest
import torch

import support_matrix as sm
from qruntime.ops.decode import reference_ops
from qruntime.runtime import Decoder, UnsupportedModelError, generate
from qruntime.runtime.decoder import Sampler

READ = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "starcoder2", "gpt2"]
RECIPES = [None, "w8a16", "w4a16-g32-rtn", "w4a16-g32-rtn-emb8", "2:4-magnitude", "2:4-magnitude+w8a16"]
TOL = 1e-4  # float32 rounding: the decoder's ops against the model's, same weights
# under 16 tokens: the weight-only kernels multiply in fp32 at every call on both sides (from 16 rows on,
# CPUs with AVX512-BF16 multiply in bf16, ops.cpu_bf16_rows)
IDS = sm.heldout()[:1, :12]


def _compressed(family: str, recipe: str | None):
    model = sm.build(family)
    if recipe is None:
        return model
    import qruntime

    return qruntime.compress(model, recipe, inplace=False, progress=False)[0].eval()


def _full_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits[0]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check_steps(model, dec, ids, split, tol):
    """prefill ids[:split] (every position's logits), then one step per remaining token."""
    ref = _full_logits(model, ids)
    dec.reset()
    assert _rel(dec.prefill(ids[:, :split], all_logits=True), ref[:split]) < tol
    for p in range(split, ids.shape[1]):
        assert _rel(dec.step(ids[0, p])[0], ref[p]) < tol, f"step at position {p}"


@pytest.mark.parametrize("family", READ)
@pytest.mark.parametrize("recipe", RECIPES)
def test_logits_match_the_models_forward(family, recipe):
    model = _compressed(family, recipe)
    _check_steps(model, Decoder(model), IDS, 5, TOL)


@pytest.mark.parametrize("family", READ)
def test_w8a8_within_its_activation_rounding(family):
    """Per-token INT8 activations round x: float32-level differences can move a code by one step, so
    the bound is the W8A8 error itself (a fraction of the float model's distance), not float32's."""
    model = _compressed(family, "w8a8-nosq")
    ids = IDS
    err_model = _rel(_full_logits(model, ids), _full_logits(sm.build(family), ids))
    _check_steps(model, Decoder(model), ids, 5, max(TOL, 0.2 * err_model))


@pytest.mark.parametrize("family", READ)
def test_greedy_generation_is_the_argmax_of_full_forwards(family):
    model = _compressed(family, "w8a16")
    prompt = sm.heldout()[:1, :5]
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, _full_logits(model, ids)[-1:].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(Decoder(model).generate(prompt, 8, []), ids)  # []: no end token stops it
    assert torch.equal(generate(model, prompt, 8, []), ids)


def test_generation_stops_at_eos_and_returns_the_prompt_for_zero_tokens():
    model = _compressed("llama", "w8a16")
    prompt = sm.heldout()[:1, :5]
    dec = Decoder(model)
    full = dec.generate(prompt, 8, [])
    eos = int(full[0, 7])  # the third new token
    stopped = dec.generate(prompt, 8, eos_token_id=[eos, 10**6])
    assert torch.equal(stopped, full[:, : full[0, 5:].tolist().index(eos) + 6])
    assert torch.equal(dec.generate(prompt[0], 0), prompt)


def test_cache_growth_chunked_prefill_and_unfused_projections_agree():
    model = _compressed("qwen2", "w4a16-g32-rtn")  # qwen2: q/k/v biases, fused with them
    ids = sm.heldout()[:1, :12]
    want = Decoder(model).generate(ids, 20)
    assert torch.equal(Decoder(model, capacity=3).generate(ids, 20), want)
    unfused = Decoder(model, fuse=False)
    assert len(unfused.qkv[0].modules) == 3 and len(Decoder(model).qkv[0].modules) == 1
    assert torch.equal(unfused.generate(ids, 20), want)
    dec = Decoder(model, capacity=4)
    whole = dec.prefill(ids, all_logits=True)
    dec.reset()
    parts = torch.cat([dec.prefill(ids[:, :5], all_logits=True), dec.prefill(ids[:, 5:], all_logits=True)])
    assert _rel(parts, whole) < 1e-5


def test_reference_step_ops_and_thread_counts_agree():
    model = _compressed("llama", "w8a16")
    ids = IDS
    dec = Decoder(model)
    dec.ops = reference_ops  # the float64 PyTorch references of the C++ step kernels
    _check_steps(model, dec, ids, 3, TOL)
    threads = torch.get_num_threads()
    try:
        results = []
        for t in (1, 2):
            torch.set_num_threads(t)
            results.append(Decoder(model).generate(ids[:, :4], 10))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


REFUSED = {
    "gemma2": "model_type='gemma2'",
    "olmo2": "model_type='olmo2'",
    "granite": "model_type='granite'",
    "gpt_neox": "model_type='gpt_neox'",
    "bert": "model_type='bert'",
}


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_unsupported_families_are_refused_with_the_reason(family):
    model = sm.build(family)
    with pytest.raises(UnsupportedModelError, match=REFUSED[family]):
        Decoder(model)


def test_generate_falls_back_to_hugging_face_with_a_warning():
    model = sm.build("gpt_neox")
    prompt = sm.heldout()[:1, :5]
    with pytest.warns(RuntimeWarning, match="qruntime decoder not used .*gpt_neox.* Hugging Face"):
        out = generate(model, prompt, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.equal(generate(model, prompt, 4, decoder="hf"), out)
    with pytest.raises(UnsupportedModelError):
        generate(model, prompt, 4, decoder="qruntime")
    with pytest.raises(ValueError, match="decoder='fast'"):
        generate(model, prompt, 4, decoder="fast")


def test_models_it_cannot_run_as_they_are_are_refused():
    model = sm.build("llama")
    with pytest.raises(UnsupportedModelError, match=r"float tensors in \['torch.bfloat16'\].*model.float\(\)"):
        Decoder(copy.deepcopy(model).to(torch.bfloat16))
    cfg = copy.deepcopy(model.config)
    cfg.hidden_act = "relu"
    from transformers import AutoModelForCausalLM

    with pytest.raises(UnsupportedModelError, match="hidden_act='relu': the decoder's gated MLP computes silu"):
        Decoder(AutoModelForCausalLM.from_config(cfg))
    cfg = copy.deepcopy(model.config)
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    setattr(cfg, "rope_parameters" if hasattr(cfg, "rope_parameters") else "rope_scaling", rope)
    try:
        dynamic = AutoModelForCausalLM.from_config(cfg)
    except (KeyError, ValueError, TypeError) as exc:  # a transformers that spells rope settings otherwise
        pytest.skip(f"cannot build a dynamic-rope llama with this transformers: {exc}")
    with pytest.raises(UnsupportedModelError, match="rope_type='dynamic'"):
        Decoder(dynamic)


def test_bad_inputs_and_the_position_limit():
    model = _compressed("gpt2", "w8a16")  # 128 learned positions
    dec = Decoder(model)
    with pytest.raises(ValueError, match=r"shape \(2, 5\): the decoder runs one sequence"):
        dec.prefill(sm.heldout()[:, :5])
    with pytest.raises(TypeError, match="expected an integer tensor"):
        dec.prefill(torch.ones(1, 3))
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        dec.generate(sm.heldout()[:1, :3], -1)
    with pytest.raises(ValueError, match=r"shape \(1, 0\)"):
        dec.prefill(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="129 positions: this gpt2 model attends at most 128"):
        dec.generate(sm.heldout()[:1, :9], 120)
    dec.reset()
    assert not math.isnan(float(dec.prefill(sm.heldout()[:1, :3]).sum()))


@pytest.mark.parametrize("recipe", ["w8a8-nosq", "w4a16-g32-rtn-emb8", "2:4-magnitude+w8a16", "w8a16"])
def test_the_native_step_is_the_python_loop_over_the_same_kernels(recipe):
    """The whole step as one C++ call (DecodePlan) against the Python loop that calls the same kernels
    one by one: identical logits, bit for bit (the same kernels in the same order)."""
    family = {"w8a16": "qwen2", "w4a16-g32-rtn-emb8": "qwen3"}.get(recipe, "llama")  # biases; per-head q/k norms
    model = _compressed(family, recipe)
    if recipe == "w8a16":
        model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)  # a float head
    native, loop = Decoder(model, capacity=4), Decoder(model, capacity=4)
    loop.native_step = False
    ids = IDS
    native.prefill(ids[:, :3])
    loop.prefill(ids[:, :3])
    for p in range(3, ids.shape[1]):  # past the capacity: the plan follows the grown caches
        assert torch.equal(native.step(ids[0, p]), loop.step(ids[0, p])), f"position {p}"
    assert native.native is not None and loop.native is None
    from qruntime.nn.modules import QuantLinear

    assert native.head_in_plan == isinstance(model.lm_head, QuantLinear)  # -emb8: the tied head is packed


def test_decode_plan_argument_errors_name_the_values():
    import numpy as np
    from qruntime.ops.extension import extension

    ext = extension()
    bufs = tuple(np.zeros((1, n), np.float32) for n in (8, 8, 24, 8, 8, 32, 16, 10))
    with pytest.raises(ValueError, match="heads=3, kv_heads=2"):
        ext.DecodePlan(8, 3, 2, 4, 16, False, 0, 0.5, bufs)
    with pytest.raises(ValueError, match=r"qkv: shape \(1, 20\) holds 20 values, expected 16"):
        ext.DecodePlan(8, 2, 1, 4, 16, False, 0, 0.5, (bufs[0], bufs[1], np.zeros((1, 20), np.float32), *bufs[3:]))
    plan = ext.DecodePlan(8, 2, 2, 4, 16, False, 0, 0.5, bufs)
    with pytest.raises(ValueError, match="set_state first"):
        plan.run(0, 1)
    norm = (np.ones(8, np.float32), None, 1e-5)
    with pytest.raises(ValueError, match="plan GEMM 'f32_gemm'"):
        plan.add_block(norm, norm, [("f32_gemm", (), 24, 8, 0)], [], [], [])
    with pytest.raises(ValueError, match="norm bias given to an RMSNorm plan"):
        plan.add_block((norm[0], norm[0], 1e-5), norm, [], [], [], [])


def test_speed_paths_say_what_ran_each_model():
    from qruntime.eval.speed import compare_causal_lm, runner

    llama, neox = sm.build("llama"), sm.build("gpt_neox")
    assert runner(llama, "auto")[1] == "qruntime decoder" and runner(llama, "hf") == (llama, "HF forward")
    model, path = runner(neox, "auto")
    assert model is neox and path.startswith("HF forward (model_type='gpt_neox': not a family the decoder computes")
    with pytest.raises(UnsupportedModelError):
        runner(neox, "qruntime")
    with pytest.raises(ValueError, match="path='fast'"):
        runner(llama, "fast")
    res = compare_causal_lm({"a": llama, "b": neox}, sm.heldout()[:1], prompt_len=4, decode_steps=2, rounds=1,
                            paths="auto")
    assert res["a"]["path"] == "qruntime decoder" and res["b"]["path"].startswith("HF forward (")
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in res.values())


def test_the_models_end_token_stops_generation_by_default():
    model = _compressed("llama", "w8a16")
    prompt = sm.heldout()[:1, :5]
    full = Decoder(model).generate(prompt, 8, [])
    model.generation_config.eos_token_id = int(full[0, 7])  # the third new token
    want = full[:, : full[0, 5:].tolist().index(int(full[0, 7])) + 6]
    assert torch.equal(Decoder(model).generate(prompt, 8), want)
    assert torch.equal(generate(model, prompt, 8), want)
    assert torch.equal(generate(model, prompt, 8, decoder="hf"), want)
    assert torch.equal(generate(model, prompt, 8, [], decoder="hf"), full)


def test_sampling_draws_within_top_k_and_top_p_reproducibly():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    draws = [Sampler(True, top_k=3, generator=g)(logits) for _ in range(400)]
    assert set(draws) == {0, 1, 2}
    p = (logits[:3]).softmax(-1)
    counts = torch.bincount(torch.tensor(draws), minlength=3)[:3].double() / 400
    assert (counts - p).abs().max() < 0.08  # the renormalized probabilities, within sampling noise
    p_all = logits.softmax(-1)  # top_p=0.9: the smallest prefix reaching 0.9 is tokens 0..2 (0.665, 0.245, 0.09)
    assert p_all[:2].sum() < 0.9 <= p_all[:3].sum()
    assert set(Sampler(True, top_p=0.9, generator=g)(logits) for _ in range(300)) == {0, 1, 2}
    assert {Sampler(True, top_k=1)(logits) for _ in range(20)} == {0}
    assert {Sampler(True, temperature=1e-3)(logits) for _ in range(20)} == {0}
    model = _compressed("llama", "w8a16")
    prompt = sm.heldout()[:1, :5]
    runs = [Decoder(model).generate(prompt, 10, [], do_sample=True, temperature=2.0,
                                    generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = Decoder(model).generate(prompt, 10, [])
    assert not torch.equal(runs[0], greedy)  # 10 draws at temperature 2 over 128 tokens: never all the argmax
    assert torch.equal(generate(model, prompt, 10, [], do_sample=True, top_k=1), greedy)
    neox = sm.build("gpt_neox")
    with pytest.warns(RuntimeWarning, match="qruntime decoder not used"):
        hf_sampled = generate(neox, prompt, 4, [], do_sample=True, top_k=1)
    assert torch.equal(hf_sampled, generate(neox, prompt, 4, [], decoder="hf"))


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.7), "with do_sample=False"),
    (dict(do_sample=True, temperature=0.0), "temperature=0.0: must be a positive number"),
    (dict(do_sample=True, top_k=0), "top_k=0: must be an int >= 1"),
    (dict(do_sample=True, top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
])
def test_sampling_arguments_are_checked_on_both_paths(kwargs, message):
    for family in ("llama", "gpt_neox"):
        with pytest.raises(ValueError, match=message):
            generate(sm.build(family), sm.heldout()[:1, :3], 2, **kwargs)
