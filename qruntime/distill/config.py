"""The settings of depth distillation: :class:`DistillConfig`, the block selection methods and
:func:`check_keep`.

Imports: nothing from qruntime.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DistillConfig", "SELECTION_METHODS", "check_keep"]


SELECTION_METHODS: dict[str, str] = {
    "greedy": "drop, one at a time, the block whose removal changes the teacher's outputs least on the "
    "selection data (measured, re-measured after each drop)",
    "single": "drop the blocks whose removal alone changes the outputs least (measured once per block)",
    "influence": "drop the blocks that change their input least (1 - cosine of input and output "
    "hidden states, one pass)",
    "angular": "drop the contiguous run of blocks whose input and output hidden states are closest "
    "in angle (one pass)",
    "uniform": "keep evenly spaced blocks (every other one at half depth); not measured",
    "first": "keep the first blocks; not measured",
    "middle": "drop the middle blocks; not measured",
}


@dataclass(frozen=True)
class DistillConfig:
    """How a smaller-depth student is built and trained from a teacher (:func:`qruntime.distill`).

    Student:
        num_layers: blocks the student keeps; or ``keep``: the teacher's block indices to keep
            (strictly increasing). At most one of them; neither when :func:`qruntime.distill` is given
            the student (or its depth) directly.
        selection: how the kept blocks are chosen when only ``num_layers`` is given (see
            :data:`SELECTION_METHODS`); the measured ones run ``selection_batches`` batches of the
            training data (spread evenly over it) through the teacher.

    Loss (each term's weight; 0 turns it off):
        alpha_kd: ``T^2 * KL(teacher || student)`` of the output logits at temperature ``temperature``
            (models with logits: causal LMs, classifiers). For a model without logits (an encoder) the
            default loss (``alpha_kd=1`` alone) becomes ``alpha_hidden=1`` + ``alpha_cosine=1``; the
            report lists the weights used.
        alpha_hidden: MSE between each student block's output and the output of the teacher block it
            was copied from, divided by the teacher's mean square (scale-free).
        alpha_cosine: ``1 - cosine`` of the last hidden states, per token (encoders: the embeddings).
        alpha_attention: KL between the teacher's and the student's attention probabilities on mapped
            blocks (needs a model that returns them, i.e. eager attention).
        alpha_ce: cross-entropy on the next token of the text (causal LMs only).
        top_k: if set, the KD term uses only the teacher's top-k logits (renormalized), which is what
            ``cache_teacher`` stores per token instead of the full vocabulary.
        cache_teacher: run the teacher once over the training data before training and keep its top-k
            logits (needs ``top_k``; no hidden/attention terms), so the teacher is not run per step.

    Training:
        steps: optimizer steps; each sees ``grad_accum`` batches of the training data (cycled when
            shorter). lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to
            ``min_lr_ratio * lr``. max_grad_norm: clipping (0: none).
        trainable: ``"no-embeddings"`` (default: everything but the input embedding and an output head
            tied to it, so the vocabulary matrix is neither updated nor given optimizer state) or
            ``"all"``.
        autocast: ``"auto"`` (bf16 where the device runs it natively: CUDA with bf16, or a CPU with
            AVX-512 BF16/AMX), ``"bf16"`` or ``"off"``. Weights and optimizer state stay float32.
        dropout: train the student with its dropout layers active (its ``train()`` mode). Off by
            default: the student trains in ``eval()`` mode, the same function the teacher computes, which
            fits it faster in a short budget (MiniLM 6 -> 3 blocks, equal steps: sentence cosine 0.887
            against 0.875 with BERT's 0.1 dropout; docs/distillation.md). Models without dropout (Llama,
            SmolLM2) train the same either way. Gradient checkpointing (``gradient_checkpointing_enable()``)
            stays on in eval mode: the checkpointed layers alone keep their training flag.
        eval_every: evaluate on the held-out batches every this many steps (0: only before and after).
        max_seconds: stop after this much training time (the report says so); the learning rate then
            decays by time or steps, whichever is further along, so the run is not bit-reproducible.
        seed: the only random numbers are the order of the data when ``shuffle``, and dropout's with
            ``dropout=True``.
    """

    num_layers: int | None = None
    keep: tuple[int, ...] | None = None
    selection: str = "single"
    selection_batches: int = 4
    alpha_kd: float = 1.0
    alpha_hidden: float = 0.0
    alpha_cosine: float = 0.0
    alpha_attention: float = 0.0
    alpha_ce: float = 0.0
    temperature: float = 1.0
    top_k: int | None = None
    cache_teacher: bool = False
    steps: int = 100
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    trainable: str = "no-embeddings"
    autocast: str = "auto"
    dropout: bool = False
    eval_every: int = 0
    max_seconds: float | None = None
    shuffle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_layers is not None and self.keep is not None:
            raise ValueError(f"num_layers={self.num_layers!r}, keep={self.keep!r}: give one of them, not both")
        if self.num_layers is not None and (isinstance(self.num_layers, bool) or not isinstance(self.num_layers, int)):
            raise TypeError(f"num_layers={self.num_layers!r}: must be an int")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers}: must be >= 1")
        if self.keep is not None:
            object.__setattr__(self, "keep", check_keep(self.keep))
        if self.selection not in SELECTION_METHODS:
            raise ValueError(f"selection={self.selection!r}: must be one of {sorted(SELECTION_METHODS)}")
        if self.selection_batches < 1:
            raise ValueError(f"selection_batches={self.selection_batches}: must be >= 1")
        alphas = {k: getattr(self, k) for k in ("alpha_kd", "alpha_hidden", "alpha_cosine", "alpha_attention", "alpha_ce")}
        if any(a < 0 for a in alphas.values()) or not any(a > 0 for a in alphas.values()):
            raise ValueError(f"loss weights {alphas}: must be >= 0 with at least one > 0")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: must be > 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k}: must be >= 1 or None")
        if self.cache_teacher and self.top_k is None:
            raise ValueError("cache_teacher=True needs top_k (the cache keeps the teacher's top-k logits per token)")
        if self.cache_teacher and (self.alpha_hidden or self.alpha_attention or self.alpha_cosine):
            raise ValueError(
                "cache_teacher=True keeps only the teacher's logits: alpha_hidden, alpha_cosine and "
                "alpha_attention must be 0"
            )
        if self.steps < 0 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"steps={self.steps}, grad_accum={self.grad_accum}, warmup_steps={self.warmup_steps}: "
                "need steps >= 0, grad_accum >= 1, warmup_steps >= 0"
            )
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.min_lr_ratio <= 1 or self.max_grad_norm < 0:
            raise ValueError(
                f"lr={self.lr}, weight_decay={self.weight_decay}, min_lr_ratio={self.min_lr_ratio}, "
                f"max_grad_norm={self.max_grad_norm}: need lr > 0, weight_decay >= 0, 0 <= min_lr_ratio <= 1, "
                "max_grad_norm >= 0"
            )
        if self.trainable not in ("no-embeddings", "all"):
            raise ValueError(f"trainable={self.trainable!r}: must be 'no-embeddings' or 'all'")
        if not isinstance(self.dropout, bool):
            raise TypeError(f"dropout={self.dropout!r}: must be True or False")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"autocast={self.autocast!r}: must be 'auto', 'bf16' or 'off'")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every}: must be >= 0")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds={self.max_seconds}: must be > 0 or None")


def check_keep(keep) -> tuple[int, ...]:
    """``keep`` as a tuple of block indices, checked to be ints, non-negative and strictly increasing
    (the range is checked against the model in :func:`qruntime.distill.make_student`)."""
    if isinstance(keep, (str, bytes)) or not hasattr(keep, "__iter__"):
        raise TypeError(f"keep={keep!r}: must be a sequence of block indices")
    keep = tuple(keep)
    if not keep:
        raise ValueError("keep=(): the student needs at least one block")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
        raise TypeError(f"keep={keep}: block indices must be ints")
    repeated = sorted({i for i in keep if keep.count(i) > 1})
    if repeated:
        raise ValueError(f"keep={list(keep)}: block indices {repeated} are repeated")
    if any(i < 0 for i in keep):
        raise ValueError(f"keep={list(keep)}: block indices must be >= 0")
    if list(keep) != sorted(keep):
        raise ValueError(f"keep={list(keep)}: must be increasing (the student keeps the teacher's block order)")
    return keep
