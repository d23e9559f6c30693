"""Depth distillation: student construction (GPT-2, BERT, Llama), block selection, the KD loss against
its closed form, training that lowers the held-out KL, masks, determinism, bad inputs, compress()."""
from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qruntime
from qruntime.distill.config import DistillConfig
from qruntime.recipes.presets import resolve_config
from qruntime.distill.losses import kd_loss
from qruntime.distill.selection import _Divergence, choose_layers
from qruntime.distill.student import make_student
from qruntime.distill.trainer import evaluate_student, teacher_topk
from qruntime.plumbing.model import find_blocks

VOCAB = 96
DEPTH = 6


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    # a large initializer range so that every block changes the output (a default-initialized tiny
    # model is nearly the identity, and dropping blocks would measure nothing)
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=DEPTH, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=VOCAB, initializer_range=0.15, bos_token_id=0, eos_token_id=1,
                      pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=48, n_layer=DEPTH, n_head=4, vocab_size=VOCAB, n_positions=64, initializer_range=0.15,
                     bos_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def _bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=48, num_hidden_layers=DEPTH, num_attention_heads=4, intermediate_size=96,
                     vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.15)
    return BertModel(cfg).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "bert": _bert}


def _ids(n: int, batch: int = 2, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def _padded(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (2, 12), generator=g)
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[1, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _data(kind: str, n: int, seed: int = 0):
    return _padded(n, seed) if kind == "bert" else _ids(n, seed=seed)


def _out(model, batch):
    inputs = batch if isinstance(batch, dict) else {"input_ids": batch}
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_student_from_keep_forward_generate_save_reload(kind, tmp_path):
    teacher = BUILDERS[kind]()
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    batch = _data(kind, 1)[0]
    with torch.no_grad():
        teacher_out = _out(teacher, batch)
    keep = [0, 2, 5]
    student = make_student(teacher, keep=keep)
    blocks = find_blocks(student)
    assert len(blocks) == 3 and student.config.num_hidden_layers == 3
    assert student.config.qruntime_student == {"teacher_num_layers": DEPTH, "kept_layers": keep, "selection": "given"}
    # the teacher is untouched and shares no storage with the student
    assert len(find_blocks(teacher)) == DEPTH
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_state.items())
    t_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not any(p.data_ptr() in t_ptrs for p in student.parameters())
    # the kept blocks are the teacher's, renumbered
    for j, i in enumerate(keep):
        s_block, t_block = blocks.layers[j], find_blocks(teacher).layers[i]
        for (name, a), b in zip(s_block.state_dict().items(), t_block.state_dict().values()):
            assert torch.equal(a, b), name
        idx = [m.layer_idx for m in s_block.modules() if isinstance(getattr(m, "layer_idx", None), int)]
        assert idx and all(k == j for k in idx)
    with torch.no_grad():
        student_out = _out(student, batch)
        assert student_out.shape == teacher_out.shape and torch.isfinite(student_out).all()
        assert not torch.allclose(student_out, teacher_out)  # three blocks are gone
        if kind != "bert":
            gen = student.generate(batch[:1, :5], max_new_tokens=6, do_sample=False)
            assert gen.shape == (1, 11)
            # generation with the KV cache equals a full forward pass over the same tokens
            full = student(gen[:, :-1]).logits[0, -1].argmax()
            assert full.item() == gen[0, -1].item()
    student.save_pretrained(tmp_path)
    reloaded = type(student).from_pretrained(tmp_path).eval()
    assert reloaded.config.num_hidden_layers == 3 and len(find_blocks(reloaded)) == 3
    with torch.no_grad():
        torch.testing.assert_close(_out(reloaded, batch), student_out, rtol=0, atol=0)


def test_find_blocks_paths_and_errors():
    assert find_blocks(_llama()).path == "model.layers"
    assert find_blocks(_gpt2()).path == "transformer.h"
    assert find_blocks(_bert()).path == "encoder.layer"
    with pytest.raises(ValueError, match="not a submodule"):
        find_blocks(_llama(), "model.nothing")
    with pytest.raises(ValueError, match="expected a non-empty nn.ModuleList"):
        find_blocks(_llama(), "model.norm")

    class Twin(nn.Module):  # an encoder-decoder-like model: two lists of the configured depth
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 2})()
            self.encoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.decoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    with pytest.raises(ValueError, match="several lists of 2 blocks"):
        find_blocks(Twin())
    assert find_blocks(Twin(), "decoder").path == "decoder"


# ------------------------------------------------------------------------------------ selection


def test_naive_selections():
    from qruntime.distill.selection import _naive_keep

    assert _naive_keep("uniform", 30, 15) == list(range(0, 30, 2))  # every other block
    assert _naive_keep("first", 30, 15) == list(range(15))
    assert _naive_keep("middle", 30, 22) == [*range(11), *range(19, 30)]
    assert _naive_keep("uniform", 6, 3) == [0, 2, 4]


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("method", ["greedy", "single", "influence", "angular", "uniform", "first", "middle"])
def test_choose_layers(kind, method):
    model = BUILDERS[kind]()
    data = _data(kind, 2)
    choice = choose_layers(model, 3, method, data, progress=False)
    assert len(choice.keep) == 3 and choice.keep == sorted(set(choice.keep))
    assert all(0 <= i < DEPTH for i in choice.keep)
    assert choice.divergence is not None and choice.divergence >= 0
    # the measured divergence is that of the kept subset, recomputed independently
    div = _Divergence(model, find_blocks(model), data, progress=False)
    assert math.isclose(div(choice.keep), choice.divergence, rel_tol=1e-6, abs_tol=1e-9)
    assert len(find_blocks(model)) == DEPTH and model.config.num_hidden_layers == DEPTH  # restored


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_greedy_is_best_single_drop_and_shared_prefix_is_exact(kind):
    model = BUILDERS[kind]()
    data = _data(kind, 2)
    div = _Divergence(model, find_blocks(model), data, progress=False)
    keep = [0, 1, 3, 4, 5]
    fast = div.drop_scores(keep)
    slow = {b: div([k for k in keep if k != b]) for b in keep}
    for b in keep:
        assert math.isclose(fast[b], slow[b], rel_tol=1e-5, abs_tol=1e-7), (b, fast[b], slow[b])
    greedy = choose_layers(model, DEPTH - 1, "greedy", data, progress=False)
    alone = {b: div([k for k in range(DEPTH) if k != b]) for b in range(DEPTH)}
    assert greedy.dropped_order == [min(alone, key=alone.get)]


def test_measured_selection_beats_naive_on_a_model_with_idle_blocks():
    """Blocks 1, 2 and 4 are made (nearly) the identity: a measured choice must find and drop them."""
    model = _llama()
    with torch.no_grad():
        for i in (1, 2, 4):
            block = find_blocks(model).layers[i]
            block.self_attn.o_proj.weight.mul_(1e-4)
            block.mlp.down_proj.weight.mul_(1e-4)
    data = _ids(2)
    results = {m: choose_layers(model, 3, m, data, progress=False) for m in ("greedy", "single", "influence", "uniform", "middle")}
    for m in ("greedy", "single", "influence"):
        assert results[m].keep == [0, 3, 5], (m, results[m].keep)
        assert results[m].divergence < 0.01 * min(results["uniform"].divergence, results["middle"].divergence)


def test_measured_selection_needs_data():
    with pytest.raises(ValueError, match="measured on data"):
        choose_layers(_llama(), 3, "greedy")
    assert choose_layers(_llama(), 3, "uniform").divergence is None


# ------------------------------------------------------------------------------------ KD loss


def test_kd_loss_closed_form():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    t = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    for temperature in (1.0, 2.0, 0.5):
        p = torch.softmax(t / temperature, -1)
        q = torch.softmax(s / temperature, -1)
        expected = temperature**2 * (p * (p.log() - q.log())).sum(-1).mean()
        torch.testing.assert_close(kd_loss(s, t, temperature).double(), expected, rtol=1e-5, atol=1e-7)
    # known distributions: p = (1/2, 1/2), q = (1/4, 3/4) -> KL = 1/2 ln(2) + 1/2 ln(2/3)
    known = kd_loss(torch.log(torch.tensor([[0.25, 0.75]])), torch.log(torch.tensor([[0.5, 0.5]])))
    assert math.isclose(known.item(), 0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel_tol=1e-6)
    assert kd_loss(t, t).abs().item() < 1e-6
    # the mask averages over the real positions only
    mask = torch.zeros(3, 5)
    mask[0, :2] = 1
    p, q = torch.softmax(t[0, :2], -1), torch.softmax(s[0, :2], -1)
    torch.testing.assert_close(kd_loss(s, t, mask=mask).double(), (p * (p / q).log()).sum(-1).mean(), rtol=1e-5, atol=1e-7)


def test_kd_loss_gradient_matches_autograd():
    """The full-vocabulary KL is computed a few rows at a time with its gradient formed in the same pass
    (_ChunkedKL): its value and gradient must equal autograd through the plain float64 formula, for row
    counts that are not a multiple of the chunk, a mask, temperatures, bf16 logits and 1-D input."""
    def reference(s, t, temperature, mask):
        q_log = torch.log_softmax(s.double() / temperature, -1)
        p_log = torch.log_softmax(t.double() / temperature, -1)
        per = (p_log.exp() * (p_log - q_log)).sum(-1)
        return temperature**2 * ((per * mask).sum() / mask.sum() if mask is not None else per.mean())

    for shape, dtype, temperature in [((3, 37, 101), torch.float32, 1.0), ((2, 17, 64), torch.bfloat16, 2.0),
                                      ((5, 33), torch.float32, 0.5), ((50,), torch.float32, 1.0)]:
        s = (4 * torch.randn(shape)).to(dtype).requires_grad_()
        t = (4 * torch.randn(shape)).to(dtype)
        mask = (torch.rand(shape[:-1]) > 0.3).float() if len(shape) > 1 else None
        if mask is not None:
            mask.view(-1)[0] = 1
        loss = kd_loss(s, t, temperature, mask)
        loss.backward()
        s64 = s.detach().double().requires_grad_()
        expected = reference(s64, t, temperature, mask)
        expected.backward()
        assert abs(loss.item() - expected.item()) <= 1e-5 * expected.item()
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the bf16 gradient is rounded to bf16, as autograd's would be
        assert s.grad.dtype == dtype
        assert ((s.grad.double() - s64.grad).norm() / s64.grad.norm()).item() < tol
    # float64 throughout: the analytical backward against finite differences
    s = torch.randn(4, 19, 23, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 19, 23, dtype=torch.float64)
    mask = (torch.rand(4, 19) > 0.3).double()
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 1.5, mask), (s,))
    # no gradient is formed for the teacher side, and none when the student needs none
    tt = t.clone().requires_grad_()
    kd_loss(s, tt).backward()
    assert tt.grad is None
    with torch.no_grad():
        assert kd_loss(s, t).requires_grad is False


def test_kd_loss_top_k():
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 7, 20, generator=g)
    t = torch.randn(4, 7, 20, generator=g)
    # k = V is the full KL; the (values, indices) form equals cutting the logits
    torch.testing.assert_close(kd_loss(s, t, top_k=20), kd_loss(s, t), rtol=1e-5, atol=1e-6)
    v, i = t.topk(5, dim=-1)
    torch.testing.assert_close(kd_loss(s, (v, i)), kd_loss(s, t, top_k=5))
    # closed form over the top-k support with the teacher renormalized
    p = torch.softmax(v.double(), -1)
    logq = torch.log_softmax(s.double(), -1).gather(-1, i)
    torch.testing.assert_close(kd_loss(s, (v, i)).double(), (p * (p.log() - logq)).sum(-1).mean(), rtol=1e-5, atol=1e-7)
    assert kd_loss(s, (v, i)).item() >= 0
    # zero when the student puts exactly the renormalized teacher mass on those tokens
    student = torch.full_like(t, -1e4).scatter(-1, i, v)
    assert kd_loss(student, (v, i)).abs().item() < 1e-5
    with pytest.raises(ValueError, match="vocabulary 20 != student vocabulary 19"):
        kd_loss(s[..., :19], t)


# ------------------------------------------------------------------------------------ training


def _kl(teacher, student, batches) -> float:
    return evaluate_student(teacher, student, batches)["kl"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_distill_lowers_held_out_kl(kind):
    teacher = BUILDERS[kind]()
    train, held_out = _ids(24, seed=1), _ids(4, seed=2)
    cfg = DistillConfig(selection="uniform", steps=40, lr=3e-3, warmup_steps=4, eval_every=20, trainable="all")
    student, report = qruntime.distill(teacher, 3, train, cfg, eval_data=held_out, progress=False)
    assert report.before["kl"] > 0.01
    assert report.after["kl"] < 0.8 * report.before["kl"], (report.before, report.after)
    assert math.isclose(report.after["kl"], _kl(teacher, student, held_out), rel_tol=1e-6)
    assert [h["step"] for h in report.history] == [0, 20, 40]
    assert [h["train_tokens"] for h in report.history] == [0, 20 * 32, 40 * 32]
    assert all(h["tokens"] == 4 * 32 for h in report.history)  # the held-out tokens
    assert report.steps == 40 and report.tokens == 40 * 32 and report.student_layers == 3
    assert report.kept_layers == [0, 2, 4] and report.loss_weights["kd"] == 1.0
    assert "perplexity" in report.after and "perplexity" in report.teacher
    assert "held-out" in report.table() and len(report.losses) == 40


def test_distill_encoder_with_hidden_cosine_and_attention_terms():
    teacher = _bert()
    impl = teacher.config._attn_implementation
    train, held_out = _padded(16, seed=1), _padded(3, seed=2)
    cfg = DistillConfig(selection="uniform", steps=30, lr=3e-3, alpha_kd=0, alpha_cosine=1, alpha_hidden=1,
                        alpha_attention=1, trainable="all")
    _, report = qruntime.distill(teacher, 3, train, cfg, eval_data=held_out, progress=False)
    assert report.after["cosine"] > report.before["cosine"]
    assert 1 - report.after["token_cosine"] < 0.7 * (1 - report.before["token_cosine"])
    assert teacher.config._attn_implementation == impl  # switched to eager for the attention term, restored
    # the default loss of an encoder (no logits): hidden + cosine, listed in the report
    _, default = qruntime.distill(teacher, 3, train[:2], DistillConfig(selection="uniform", steps=1), progress=False)
    assert default.loss_weights == {"kd": 0.0, "hidden": 1.0, "cosine": 1.0, "attention": 0.0, "ce": 0.0}


def test_distill_is_deterministic_and_leaves_the_teacher_alone():
    teacher = _gpt2()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    train = _ids(6, seed=3)
    cfg = DistillConfig(selection="greedy", selection_batches=2, steps=5, lr=1e-3, alpha_hidden=0.5, alpha_ce=0.1, shuffle=True, seed=7)
    a, ra = qruntime.distill(teacher, 4, train, cfg, progress=False)
    b, rb = qruntime.distill(teacher, 4, train, cfg, progress=False)
    assert ra.kept_layers == rb.kept_layers and ra.losses == rb.losses
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert teacher.training is False and all(p.requires_grad for p in teacher.parameters())
    assert a.config.qruntime_student["selection"] == "greedy"


def test_default_selection_batches_are_spread_over_the_training_data(monkeypatch):
    # sorted data (batch i holds sentences of length i + 2): the selection must not see only the first,
    # shortest, batches; it gets the middle batch of each equal stretch
    import sys

    dmod = sys.modules["qruntime.distill.trainer"]
    assert dmod._spread(list(range(10)), 4) == [1, 3, 6, 8]
    assert dmod._spread(list(range(10)), 1) == [5]
    assert dmod._spread(list(range(3)), 4) == [0, 1, 2]
    teacher = _gpt2()
    train = [torch.randint(2, VOCAB, (2, i + 2)) for i in range(12)]
    seen = []
    real = dmod.make_student

    def spy(model, num_layers=None, keep=None, *, data=None, **kw):
        seen.extend(b.shape[1] for b in data)
        return real(model, num_layers, keep, data=data, **kw)

    monkeypatch.setattr(dmod, "make_student", spy)
    qruntime.distill(teacher, 2, train, DistillConfig(selection="single", selection_batches=3, steps=1, shuffle=True), progress=False)
    assert seen == [4, 8, 12]  # lengths of batches 2, 6, 10 of 12
    seen.clear()
    qruntime.distill(teacher, 2, train, DistillConfig(selection="single", selection_batches=3, steps=1, shuffle=True),
                     selection_data=train[:2], progress=False)
    assert seen == [2, 3]  # selection_data as given
    # these batches grow in length: trained in that order (shuffle=False), a warning says so
    with pytest.warns(UserWarning, match=r"the 12 batches grow from 2 to 13 tokens .* pass DistillConfig\(shuffle=True\)"):
        qruntime.distill(teacher, 2, train, DistillConfig(selection="uniform", steps=1), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shuffled, or in no length order: no warning
        qruntime.distill(teacher, 2, train, DistillConfig(selection="uniform", steps=1, shuffle=True), progress=False)
        qruntime.distill(teacher, 2, train[::-1], DistillConfig(selection="uniform", steps=1), progress=False)


def test_dropout_is_off_unless_asked_for():
    # a BERT student with dropout 0.5: it trains in eval mode by default (no dropout: the seed then
    # changes nothing without shuffling), in train mode with dropout=True; its mode is restored after
    teacher = _bert()
    train = _padded(3, seed=4)

    def run(dropout: bool, seed: int):
        student = make_student(teacher, keep=[0, 2, 5])
        for m in student.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.5
        student.train()
        modes = []
        hook = student.register_forward_pre_hook(lambda mod, args: modes.append(mod.training))
        cfg = DistillConfig(steps=3, lr=1e-3, alpha_kd=0, alpha_hidden=1, alpha_cosine=1, dropout=dropout, seed=seed)
        qruntime.distill(teacher, student, train, cfg, progress=False)
        hook.remove()
        assert student.training  # restored
        return student, set(modes)

    a, modes_a = run(False, 1)
    b, _ = run(False, 2)
    c, modes_c = run(True, 1)
    d, _ = run(True, 2)
    assert modes_a == {False} and modes_c == {True}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(c.state_dict().values(), d.state_dict().values()))
    with pytest.raises(TypeError, match="dropout='yes'"):
        DistillConfig(dropout="yes")


def test_gradient_checkpointing_stays_on_without_dropout():
    # eval mode (no dropout) must not switch off a student's gradient checkpointing: its layers run twice
    # per step (forward, then again in backward), and train to the same weights as without checkpointing
    teacher = _bert()
    train = _padded(2, seed=5)

    def run(checkpointing: bool):
        student = make_student(teacher, keep=[0, 3, 5])
        assert not any(m.training for m in student.modules())  # the teacher's eval mode, its new block list too
        for m in student.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.5  # would make the two runs differ if dropout were on
        if checkpointing:
            (getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable)()
        modes = [m.training for m in student.modules()]
        calls = []
        hook = student.encoder.layer[1].intermediate.register_forward_hook(lambda *a: calls.append(1))
        cfg = DistillConfig(steps=2, lr=1e-3, alpha_kd=0, alpha_hidden=1, alpha_cosine=1)
        qruntime.distill(teacher, student, train, cfg, progress=False)
        hook.remove()
        assert [m.training for m in student.modules()] == modes  # every module's mode restored
        return student, len(calls)

    plain, plain_calls = run(False)
    ckpt, ckpt_calls = run(True)
    assert plain_calls == 2 and ckpt_calls == 4
    for (name, x), y in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-6), name


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def test_sentence_batches_sorted_by_length_keep_every_sentence_once():
    from qruntime.calibration.stats import sentence_batches

    g = torch.Generator().manual_seed(5)
    words = [f"w{i}" for i in range(50)]
    tok = _word_tokenizer([*words, ".", "!"])
    sentences = [" ".join(words[j] for j in torch.randint(0, 50, (int(n),), generator=g).tolist()) + (" ." if n % 2 else " !")
                 for n in torch.randint(1, 30, (45,), generator=g)]
    text = " ".join(sentences[:20]) + "\n" + "\n".join(sentences[20:])  # split after . or ! and at line breaks
    kept = [s for s in sentences if len(s.split()) >= 4]  # min_words=4 ("." and "!" are words here)
    assert 20 < len(kept) < 45

    def rows(batches):
        out = []
        for b in batches:
            assert set(b) == {"input_ids", "attention_mask"}
            assert b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]  # padded to its longest
            out += [tuple(r[m.bool()].tolist()) for r, m in zip(b["input_ids"], b["attention_mask"])]
        return out

    ref = sorted(tuple(tok(s)["input_ids"]) for s in kept)
    plain = sentence_batches(tok, text, batch_size=8, max_length=64, sort_by_length=False)
    packed = sentence_batches(tok, text, batch_size=8, max_length=64)
    assert sorted(rows(plain)) == ref and sorted(rows(packed)) == ref  # every sentence once
    assert [len(b["input_ids"]) for b in packed] == [8] * (len(kept) // 8) + [len(kept) % 8] * bool(len(kept) % 8)
    lengths = [b["input_ids"].shape[1] for b in packed]
    assert lengths == sorted(lengths)
    pad = lambda bs: sum(b["attention_mask"].numel() - b["attention_mask"].sum().item() for b in bs)  # noqa: E731
    assert pad(packed) < pad(plain)
    # truncation; a list of sentences is taken as given; limit
    assert max(b["input_ids"].shape[1] for b in sentence_batches(tok, text, batch_size=8, max_length=5)) == 5
    assert sorted(rows(sentence_batches(tok, ["w1 w2", "w3"], batch_size=4))) == [tuple(tok("w1 w2")["input_ids"]), tuple(tok("w3")["input_ids"])]
    assert len(sentence_batches(tok, text, batch_size=4, limit=2)) == 2


class _Rotated(nn.Module):
    """An encoder whose last hidden states are ``inner``'s turned by the orthogonal matrix ``q``."""

    def __init__(self, inner: nn.Module, q: torch.Tensor):
        super().__init__()
        self.inner, self.q = inner, q

    def forward(self, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.inner(**kw).last_hidden_state @ self.q)


def _labelled_sentences(words: list[str], labels: list[int], g: torch.Generator) -> list[str]:
    """8 words a sentence, from the 40 ``words``: six of them from the first half of the vocabulary for
    label 1 and from the second half for label 0 (the other two the other way), so a probe can learn the label."""
    return [" ".join(words[j + (20 if (k < 6) != bool(y) else 0)]
                     for k, j in enumerate(torch.randint(0, 20, (8,), generator=g).tolist())) for y in labels]


def test_encoder_probe_refit_is_blind_to_a_rotation_of_the_embeddings():
    # a model whose embeddings are the reference's turned by an orthogonal matrix: the reference's probe
    # no longer applies (cosine < 1), a probe refit on the model's own embeddings scores exactly as the
    # reference's (L2-regularized logistic regression is rotation-invariant)
    from qruntime.eval.evaluate import evaluate_encoder

    g = torch.Generator().manual_seed(6)
    words = [f"w{i}" for i in range(40)]
    tok = _word_tokenizer(words)
    bert = _bert()
    labels = torch.randint(0, 2, (60,), generator=g).tolist()
    sentences = _labelled_sentences(words, labels, g)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))

    same = evaluate_encoder(bert, bert, tok, sentences, labels)
    assert same.cosine_mean == pytest.approx(1.0) and same.probe_accuracy_reference > 0.6
    assert same.probe_accuracy_model == same.probe_accuracy_model_refit == same.probe_accuracy_reference
    assert same.probe_cv_model == same.probe_cv_model_refit == same.probe_cv_reference > 0.6
    assert same.probe_cv_model_se == same.probe_cv_refit_se == 0.0
    turned = evaluate_encoder(_Rotated(bert, q), bert, tok, sentences, labels)
    assert turned.cosine_mean < 0.5 and turned.probe_accuracy_model < same.probe_accuracy_reference - 0.1
    assert turned.probe_accuracy_model_refit == same.probe_accuracy_reference
    # cross-validated: the same, every sentence scored 20 times by probes that never saw it
    assert turned.probe_cv_reference == same.probe_cv_reference
    assert turned.probe_cv_model < same.probe_cv_reference - 0.1 and turned.probe_cv_model_se > 0
    assert turned.probe_cv_model_refit == pytest.approx(same.probe_cv_reference, abs=1 / 300)
    assert "20 x 10-fold over all 60" in turned.protocol


def test_sentence_embeddings_batched_by_length_in_input_order():
    # sentences of 1 to 12 words, batched longest first: each row is the sentence's own embedding, in the
    # order given, the same as embedding it alone (padding is masked)
    from qruntime.eval.evaluate import sentence_embeddings

    g = torch.Generator().manual_seed(3)
    words = [f"w{i}" for i in range(40)]
    tok = _word_tokenizer(words)
    bert = _bert()
    sentences = [" ".join(words[j] for j in torch.randint(0, 40, (n,), generator=g).tolist())
                 for n in torch.randint(1, 13, (11,), generator=g).tolist()]
    with torch.no_grad():
        batched = sentence_embeddings(bert, tok, sentences, batch_size=4)
        alone = torch.cat([sentence_embeddings(bert, tok, [s], batch_size=1) for s in sentences])
    assert batched.shape == (11, 48) and len({round(float(r[0]), 6) for r in batched}) == 11
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(11))
    with pytest.raises(ValueError, match="sentences: empty"):
        sentence_embeddings(bert, tok, [])


@pytest.mark.parametrize(
    "sentences, labels, match",
    [
        (["a b c"] * 5, [0, 1] * 2, r"sentences \(5\) and labels \(4\) must match"),
        (["a b c"] * 3, [0, 1, 0], r"sentences \(3\) and labels \(3\) must match, at least 4"),
        (["a b c"] * 4, [0, 1, 2, 1], "labels: the probe is binary, expected 0 / 1, got the values 0, 1, 2"),
        (["a b c"] * 4, [0, 1, 0.5, 1], "the probe is binary"),
        (["a b c"] * 4, ["pos", "neg", "pos", "neg"], "got the values 'neg', 'pos'"),
        (["a b c"] * 4, [1, 1, 1, 1], "labels: all 4 are 1: a probe needs both classes"),
        (["a b c"] * 4, [0, 1, 0, 1], r"labels\[0::2\] \(the even-indexed sentences the split's probe is fit on\): all 2 are 0"),
    ],
)
def test_evaluate_encoder_rejects_bad_labels(sentences, labels, match):
    from qruntime.eval.evaluate import evaluate_encoder

    with pytest.raises(ValueError, match=match):
        evaluate_encoder(nn.Identity(), nn.Identity(), None, sentences, labels)


def test_cross_validated_probes_score_every_sentence_and_measure_the_paired_difference():
    from qruntime.eval.evaluate import cross_validated_probes

    g = torch.Generator().manual_seed(7)
    n = 80
    y = torch.randint(0, 2, (n,), generator=g)
    signal = torch.randn(n, 16, generator=g)
    signal[:, 0] += 3 * (2 * y - 1)  # one direction carries the label
    r = cross_validated_probes(signal, signal, y, folds=8, repeats=3)
    assert r["reference"] == r["model"] == r["model_refit"] > 0.85 and r["model_se"] == r["refit_se"] == 0.0
    # the label direction wiped out: chance for both probes, and a clearly negative paired difference
    blind = signal.clone()
    blind[:, 0] = torch.randn(n, generator=g)
    b = cross_validated_probes(signal, blind, y, folds=8, repeats=3)
    assert b["reference"] == r["reference"]
    assert b["model"] < 0.7 and b["model_refit"] < 0.7
    assert 0 < b["model_se"] < (b["reference"] - b["model"]) / 2  # resolved: more than two standard errors
    # each repeat scores every sentence exactly once: accuracies are multiples of 1 / (n * repeats)
    assert b["model"] * n * 3 == pytest.approx(round(b["model"] * n * 3))
    assert cross_validated_probes(signal, blind, y.tolist(), folds=8, repeats=3) == b  # a list of labels is fine
    with pytest.raises(ValueError, match=r"folds=1: must be in \[2, number of sentences\], here 80"):
        cross_validated_probes(signal, signal, y, folds=1)
    with pytest.raises(ValueError, match="folds=81: must be in"):
        cross_validated_probes(signal, signal, y, folds=81)
    with pytest.raises(ValueError, match="repeats=0"):
        cross_validated_probes(signal, signal, y, repeats=0)
    with pytest.raises(ValueError, match=r"reference \(80 rows\), model \(79 rows\) and labels \(80\): must match"):
        cross_validated_probes(signal, signal[:-1], y)
    with pytest.raises(ValueError, match="expected 0 / 1, got the values 0, 2"):
        cross_validated_probes(signal, signal, 2 * y)
    with pytest.raises(ValueError, match="all 80 are 0: a probe needs both classes"):
        cross_validated_probes(signal, signal, torch.zeros(80, dtype=torch.long))


def _ranks_brute(x: torch.Tensor) -> torch.Tensor:
    # rank = values below + (ties, itself included, + 1) / 2: the mean rank of a run of ties
    below = (x[None, :] < x[:, None]).sum(1).double()
    ties = (x[None, :] == x[:, None]).sum(1).double()
    return below + (ties + 1) / 2


def test_similarity_correlation_matches_its_closed_form():
    from qruntime.eval.evaluate import similarity_correlation

    g = torch.Generator().manual_seed(11)
    d = 14
    ref, model = torch.randn(d, 6, generator=g), torch.randn(d, 6, generator=g)
    human = (torch.rand(d, d, generator=g) * 10).round() / 10  # ratings with many ties
    human = human.triu(1) + torch.eye(d)
    human_lower_noise = human + torch.rand(d, d, generator=g).tril(-1)  # below the diagonal: ignored
    r = similarity_correlation(ref, model, human_lower_noise)
    assert (r["documents"], r["pairs"]) == (d, d * (d - 1) // 2)
    i, j = torch.triu_indices(d, d, 1)
    rated = human[i, j].double()

    def cosines(e):
        e = e.double()
        return torch.stack([torch.dot(e[a], e[b]) / (e[a].norm() * e[b].norm()) for a, b in zip(i.tolist(), j.tolist())])

    for name, e in (("reference", ref), ("model", model)):
        sims = cosines(e)
        assert r[f"{name}_pearson"] == pytest.approx(torch.corrcoef(torch.stack([sims, rated]))[0, 1].item(), abs=1e-12)
        spearman = torch.corrcoef(torch.stack([_ranks_brute(sims), _ranks_brute(rated)]))[0, 1].item()
        assert r[f"{name}_spearman"] == pytest.approx(spearman, abs=1e-12)
    # jackknife over documents: each leave-one-out estimate is the same function on the other d - 1
    for kind in ("pearson", "spearman"):
        loo = []
        for k in range(d):
            keep = torch.arange(d) != k
            sub = similarity_correlation(ref[keep], model[keep], human[keep][:, keep])
            loo.append(sub[f"model_{kind}"] - sub[f"reference_{kind}"])
        loo = torch.tensor(loo, dtype=torch.float64)
        assert r[f"{kind}_se"] == pytest.approx(math.sqrt((d - 1) / d * ((loo - loo.mean()) ** 2).sum().item()), rel=1e-9)
        assert r[f"{kind}_se"] > 0
    same = similarity_correlation(ref, ref.clone(), human)
    assert same["model_pearson"] == same["reference_pearson"] and same["pearson_se"] == same["spearman_se"] == 0.0
    # ratings that follow one set of embeddings' cosines (rounded to tenths): those embeddings correlate
    # almost perfectly, unrelated ones do not
    good = torch.randn(d, 6, generator=g)
    e = F.normalize(good.double(), dim=-1)
    follows = (((e @ e.T + 1) / 2 * 10).round() / 10).triu(1) + torch.eye(d, dtype=torch.float64)
    fit = similarity_correlation(ref, good, follows)
    assert fit["model_pearson"] > 0.98 and fit["model_spearman"] > 0.95 and fit["reference_pearson"] < 0.6
    constant = similarity_correlation(ref, torch.ones(d, 6), human)
    assert math.isnan(constant["model_pearson"]) and not math.isnan(constant["reference_pearson"])
    with pytest.raises(ValueError, match=r"human: shape \(14, 13\), expected a square \[D, D\] matrix with D >= 3"):
        similarity_correlation(ref, model, human[:, :-1])
    with pytest.raises(ValueError, match=r"reference \(14 rows\), model \(13 rows\) and human \(14 x 14\): must match"):
        similarity_correlation(ref, model[:-1], human)
    with pytest.raises(ValueError, match="D >= 3"):
        similarity_correlation(ref[:2], model[:2], human[:2, :2])


def test_encoder_tasks_same_model_rotation_and_bad_input(monkeypatch):
    # the topic probe and the similarity task on small synthetic stand-ins for the gensim data: the
    # reference against itself differs by nothing; embeddings turned by an orthogonal matrix keep every
    # cosine (so the similarity correlations) and a refit probe's accuracy, but break the reference's probe
    import qruntime.eval.data
    from qruntime.eval.evaluate import evaluate_encoder_tasks

    g = torch.Generator().manual_seed(12)
    words = [f"w{i}" for i in range(40)]
    tok = _word_tokenizer(words)
    bert = _bert()
    labels = torch.randint(0, 2, (40,), generator=g).tolist()
    posts = list(zip(_labelled_sentences(words, labels, g), labels))
    docs = [" ".join(words[j] for j in torch.randint(0, 40, (10,), generator=g).tolist()) for _ in range(12)]
    human = (torch.rand(12, 12, generator=g).triu(1) + torch.eye(12)).tolist()
    moods = torch.randint(0, 2, (80,), generator=g).tolist()
    sentences = list(zip(_labelled_sentences(words, moods, g), moods))
    monkeypatch.setattr(qruntime.eval.data, "sentence_polarity", lambda: sentences)
    monkeypatch.setattr(qruntime.eval.data, "newsgroup_posts", lambda: posts)
    monkeypatch.setattr(qruntime.eval.data, "lee_similarities", lambda: (docs, human))
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))

    same = evaluate_encoder_tasks(bert, bert, tok, max_length=32, cv_repeats=2)
    n, sent, lee = same.newsgroups, same.sentiment, same.lee
    assert n["posts"] == 40 and sent["sentences"] == 80
    for probe in (n, sent):
        assert probe["reference"] == probe["model"] == probe["model_refit"] > 0.6
        assert probe["model_se"] == probe["refit_se"] == 0.0
    assert (lee["documents"], lee["pairs"]) == (12, 66) and lee["model_pearson"] == lee["reference_pearson"]
    assert same.max_length == 32
    assert set(same.to_dict()) == {"sentiment", "newsgroups", "lee", "max_length", "seconds"}
    turned = evaluate_encoder_tasks(_Rotated(bert, q), bert, tok, max_length=32, cv_repeats=2)
    for task, probe in (("newsgroups", n), ("sentiment", sent)):
        assert getattr(turned, task)["model"] < probe["reference"] - 0.1
        assert getattr(turned, task)["model_refit"] == pytest.approx(probe["reference"], abs=1 / 80)
    for key in ("model_pearson", "model_spearman"):
        assert turned.lee[key] == pytest.approx(lee[key], abs=1e-6)
    with pytest.raises(ValueError, match="max_length=1: must be >= 2"):
        evaluate_encoder_tasks(bert, bert, tok, max_length=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"max_length": 1}, "max_length=1"),
        ({"limit": 0}, "limit=0"),
        ({"text": "a b. c"}, "no sentence of at least min_words=4"),
        ({"text": ["w1", " "]}, r"sentences \[1\] are empty"),
        ({"text": []}, "text: an empty list of sentences"),
    ],
)
def test_sentence_batches_bad_inputs(kwargs, match):
    from qruntime.calibration.stats import sentence_batches

    tok = _word_tokenizer(["w1", "w2"])
    kwargs = {"text": "w1 w2 w1 w2 w1.", **kwargs}
    with pytest.raises(ValueError, match=match):
        sentence_batches(tok, **kwargs)


def test_frozen_embeddings_are_not_updated():
    teacher = _llama()
    student = make_student(teacher, keep=[0, 3, 5])
    emb = student.get_input_embeddings().weight.clone()
    norm = student.model.norm.weight.clone()
    _, report = qruntime.distill(teacher, student, _ids(4), DistillConfig(steps=3, lr=1e-2), progress=False)
    assert torch.equal(student.get_input_embeddings().weight, emb)
    assert not torch.equal(student.model.norm.weight, norm)
    expected = sum(p.numel() for n, p in student.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)
    assert report.trainable_parameters == expected


def test_masks_stay_zero():
    """The 2:4 recovery use: a same-depth student with fixed masks."""
    teacher = _llama()
    student = make_student(teacher, keep=list(range(DEPTH - 1)))
    masks = {}
    for name, p in student.named_parameters():
        if name.endswith("proj.weight"):
            m = (torch.rand(p.shape) > 0.5).to(p.dtype)
            with torch.no_grad():
                p.mul_(m)
            masks[name] = m
    qruntime.distill(teacher, student, _ids(4), DistillConfig(steps=4, lr=1e-2), masks=masks, progress=False)
    params = dict(student.named_parameters())
    for name, m in masks.items():
        assert (params[name][m == 0] == 0).all(), name
        assert (params[name][m == 1] != 0).any(), name
    with pytest.raises(ValueError, match="is not a parameter"):
        qruntime.distill(teacher, student, _ids(1), DistillConfig(steps=1), masks={"nope": torch.ones(1)}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        qruntime.distill(teacher, student, _ids(1), DistillConfig(steps=1),
                         masks={"model.norm.weight": torch.ones(3)}, progress=False)


def test_cached_teacher_top_k():
    torch.manual_seed(0)
    teacher = _llama()
    train, held_out = _ids(12, seed=1), _ids(3, seed=2)
    cache = teacher_topk(teacher, train[:2], 8, progress=False)
    assert cache[0][0].shape == (2, 16, 8) and cache[0][1].dtype == torch.int32
    with torch.no_grad():
        torch.testing.assert_close(cache[0][0], teacher(train[0]).logits.topk(8, dim=-1).values)
    cfg = DistillConfig(selection="uniform", steps=30, lr=3e-3, top_k=32, trainable="all", autocast="off")
    cached, rc = qruntime.distill(teacher, 3, train, replace(cfg, cache_teacher=True), eval_data=held_out, progress=False)
    # the cache holds exactly what the teacher gives on the fly: the same training, step for step
    live, rl = qruntime.distill(teacher, 3, train, cfg, eval_data=held_out, progress=False)
    assert rc.losses == rl.losses
    for (name, a), b in zip(cached.state_dict().items(), live.state_dict().values()):
        assert torch.equal(a, b), name
    # training on the cache lowers the held-out KL; how much depends on the random teacher (after / before
    # 0.72-0.91 over 8 of them), so the bound is on the median of three
    ratios = [rc.after["kl"] / rc.before["kl"]]
    for seed in (1, 2):
        torch.manual_seed(seed)
        _, other = qruntime.distill(_llama(), 3, train, replace(cfg, cache_teacher=True), eval_data=held_out, progress=False)
        ratios.append(other.after["kl"] / other.before["kl"])
    assert sorted(ratios)[1] < 0.9, ratios


def test_max_seconds_stops_early():
    cfg = DistillConfig(selection="uniform", steps=10_000, max_seconds=0.5)
    _, report = qruntime.distill(_llama(), 3, _ids(2), cfg, progress=False)
    assert report.stopped_early and report.steps < 10_000 and "max_seconds" in report.table()


# ------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"num_layers": 0}, ValueError, r"num_layers=0: must be in \[1, 5\]"),
        ({"num_layers": DEPTH}, ValueError, r"num_layers=6: must be in \[1, 5\]"),
        ({"num_layers": -1}, ValueError, r"num_layers=-1"),
        ({"num_layers": 2.0}, TypeError, "must be an int"),
        ({"keep": [0, 6]}, ValueError, "block index 6 is out of range"),
        ({"keep": [0, 2, 2]}, ValueError, r"block indices \[2\] are repeated"),
        ({"keep": [3, 1]}, ValueError, "must be increasing"),
        ({"keep": [-1, 2]}, ValueError, "must be >= 0"),
        ({"keep": list(range(DEPTH))}, ValueError, "keeps all 6 blocks"),
        ({"keep": []}, ValueError, "at least one block"),
        ({"num_layers": 2, "keep": [0, 1]}, ValueError, "exactly one"),
        ({}, ValueError, "exactly one"),
    ],
)
def test_make_student_bad_inputs(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_student(_llama(), **kwargs, method="uniform")


def test_distill_bad_inputs():
    teacher = _llama()
    with pytest.raises(ValueError, match=r"num_layers=6: must be in \[1, 5\]"):
        qruntime.distill(teacher, DEPTH, _ids(1), progress=False)
    other = make_student(teacher, keep=[0, 1])
    other.config.vocab_size = VOCAB + 4
    with pytest.raises(ValueError, match="teacher vocab_size=96 != student vocab_size=100"):
        qruntime.distill(teacher, other, _ids(1), DistillConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="data yielded no batches"):
        qruntime.distill(teacher, 3, [], progress=False)
    with pytest.raises(TypeError, match="expected a LongTensor of input ids"):
        qruntime.distill(teacher, 3, ["text"], DistillConfig(selection="uniform", steps=1), progress=False)
    with pytest.raises(ValueError, match="alpha_ce=1: the model returns no logits"):
        qruntime.distill(_bert(), 3, _padded(1), DistillConfig(selection="uniform", steps=1, alpha_kd=0,
                                                                 alpha_cosine=1, alpha_ce=1), progress=False)
    with pytest.raises(ValueError, match="returns no logits"):
        qruntime.distill(_bert(), 3, _padded(1), DistillConfig(selection="uniform", steps=1, alpha_kd=2), progress=False)
    unmapped = make_student(teacher, keep=[0, 1])
    del unmapped.config.qruntime_student
    with pytest.raises(ValueError, match="which teacher block"):
        qruntime.distill(teacher, unmapped, _ids(1), DistillConfig(steps=1, alpha_hidden=1), progress=False)
    with pytest.raises(ValueError, match="student_or_num_layers=3 but config.num_layers=2"):
        qruntime.distill(teacher, 3, _ids(1), DistillConfig(num_layers=2), progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"selection": "random"}, "selection='random'"),
        ({"alpha_kd": 0}, "at least one > 0"),
        ({"alpha_hidden": -1}, "must be >= 0"),
        ({"temperature": 0}, "temperature=0"),
        ({"cache_teacher": True}, "needs top_k"),
        ({"cache_teacher": True, "top_k": 4, "alpha_hidden": 1}, "keeps only the teacher's logits"),
        ({"steps": -1}, "steps=-1"),
        ({"lr": 0}, "lr=0"),
        ({"trainable": "some"}, "trainable='some'"),
        ({"autocast": "fp8"}, "autocast='fp8'"),
        ({"max_seconds": 0}, "max_seconds=0"),
        ({"num_layers": 0}, "num_layers=0"),
    ],
)
def test_distill_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DistillConfig(**kwargs)


# ------------------------------------------------------------------------------------ compress()


def test_compress_with_depth_stage():
    teacher = _llama()
    cfg = resolve_config("d3+w8a16-gptq")
    assert cfg.name == "d3+w8a16-gptq" and cfg.distill.num_layers == 3
    with pytest.raises(ValueError, match="needs train_data"):
        qruntime.compress(teacher, cfg, _ids(2), progress=False)
    model, report = qruntime.compress(teacher, cfg, _ids(2, seed=5), train_data=_ids(8, seed=1),
                                      eval_data=_ids(2, seed=2), progress=False)
    assert model is not teacher and len(find_blocks(teacher)) == DEPTH
    assert len(find_blocks(model)) == 3 and model.config.num_hidden_layers == 3
    assert len(report.layers) == 3 * 7 and all(l.format == "w8a16-gptq" for l in report.layers)
    assert report.distillation["student_layers"] == 3 and report.distillation["steps"] == 100
    assert "distillation" in report.stages and "distillation: 6 -> 3 blocks" in report.table()
    assert report.model_bytes_before == qruntime.nn.targets.model_bytes(teacher)  # the teacher's size
    assert "perplexity" in report.distillation["teacher"] and "held-out perplexity: teacher" in report.table()
    assert qruntime.CompressReport.from_dict(report.to_dict()).distillation == report.distillation
    with torch.no_grad():
        assert torch.isfinite(model(_ids(1)[0]).logits).all()


def test_distilled_and_quantized_checkpoint_round_trip(tmp_path):
    teacher = _llama()
    model, report = qruntime.compress(teacher, "d2+w4a16-g16-rtn", train_data=_ids(4), progress=False)
    qruntime.save(model, tmp_path / "ckpt", report=report)
    loaded = qruntime.load(tmp_path / "ckpt")
    assert loaded.config.num_hidden_layers == 2 and loaded.config.qruntime_student["teacher_num_layers"] == DEPTH
    batch = _ids(1, seed=9)[0]
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, model(batch).logits)


def test_learning_rate_schedule():
    from qruntime.distill.trainer import _lr_factor

    cfg = DistillConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert _lr_factor(cfg, 0, 0.0) == pytest.approx(1 / 11)  # linear warm-up
    assert _lr_factor(cfg, 9, 0.0) == pytest.approx(10 / 11)
    assert _lr_factor(cfg, 10, 0.0) == pytest.approx(1.0)  # cosine from the top ...
    assert _lr_factor(cfg, 60, 0.0) == pytest.approx(0.55)  # ... halfway ...
    assert _lr_factor(cfg, 110, 0.0) == pytest.approx(0.1)  # ... to min_lr_ratio
    capped = DistillConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1, max_seconds=100)
    assert _lr_factor(capped, 20, 50.0) == pytest.approx(0.55)  # time is further along than steps
    assert _lr_factor(capped, 20, 100.0) == pytest.approx(0.1)


def test_student_given_as_keep_list_or_in_the_config():
    teacher = _llama()
    _, a = qruntime.distill(teacher, [0, 3, 5], _ids(2), DistillConfig(steps=1), progress=False)
    _, b = qruntime.distill(teacher, None, _ids(2), DistillConfig(keep=(0, 3, 5), steps=1), progress=False)
    assert a.kept_layers == b.kept_layers == [0, 3, 5] and a.selection is None
    with pytest.raises(ValueError, match="no student"):
        qruntime.distill(teacher, None, _ids(1), DistillConfig(steps=1), progress=False)
