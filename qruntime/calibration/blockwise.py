"""Block-by-block calibration: each block's layers are calibrated on the outputs of the blocks before it
*as already compressed*, so a layer's mask (or rounding) compensates for the errors upstream, as in the
SparseGPT and GPTQ papers' sequential mode.

A recording forward per batch records every block's call (its non-hidden arguments, e.g. attention mask
and rotary embeddings, one copy of each distinct value: :class:`_SharedArguments`) and the hidden states
entering the first block; it stops after the last block (no output head). Only the first batch runs the
blocks: after it, a pass-through returning the block's input stands in for each block whose output is
just its new hidden states (no cache, attention weights or position bias the model passes on to the next
block), so recording costs about one batch. Then, block by block: run the block on the current hidden
states with hooks collecting ``X^T X`` of its target layers, compress those layers in place, and run the
block again to get the hidden states for the next block (each window's replacing its old ones as it is
made). Targets outside the blocks get the Hessians of the recording pass (which then runs every block on
every batch). With block tuning, the float model's hidden states are carried along too (one more forward
pass of each block), so each block's tuning targets are the float model's own outputs of that block.

The forwards may run their matmuls in bfloat16 (``precision``, :func:`qruntime.calibration.stats.forward_dtype`);
the hidden states carried from block to block keep the model's dtype.

Inside :func:`qruntime.plumbing.offload.onloaded` (``compress(..., device=...)``) the inputs go to the execution
device, each block is held there while it is worked on, and the Hessians are returned on the model's home
device.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .stats import StopForward, check_token_ids, hash_batch, raise_stop
from qruntime.plumbing.offload import current_onloader, execution_device, home_device
from qruntime.plumbing.model import autocast, find_blocks, first, model_forward, model_inputs

__all__ = ["blockwise_calibrate"]


def _hessian_hooks(layers: Mapping[str, nn.Module], sums: dict, rows: dict) -> list:
    """Forward hooks adding each layer's ``X^T X`` (float32) to ``sums``; layers fed the same tensor
    share one product (see calibrate.collect_stats)."""
    last: list = [None, -1, None]

    def make(name: str):
        def hook(module, inputs, output):
            src = inputs[0]
            x = src.detach().reshape(-1, src.shape[-1])
            if not torch.is_autocast_enabled(x.device.type):  # under autocast the product casts x itself
                x = x.to(torch.float32)
            version = getattr(src, "_version", -1)
            if last[0] is not src or last[1] != version:
                product = x.t() @ x
                # a NaN or Inf anywhere in X makes its column's sum of squares, a diagonal entry, non-finite
                if not torch.isfinite(torch.diagonal(product)).all():
                    raise ValueError(f"calibration: non-finite activations at the input of layer {name!r}")
                last[:] = [src, version, product]
            if name not in sums:  # float32 sums even when the product is bf16 (autocast)
                sums[name] = torch.zeros(last[2].shape, dtype=torch.float32, device=last[2].device)
                rows[name] = 0
            sums[name].add_(last[2])
            rows[name] += x.shape[0]

        return hook

    return [m.register_forward_hook(make(n)) for n, m in layers.items()]


@torch.no_grad()
def blockwise_calibrate(
    model: nn.Module,
    targets: Mapping[str, nn.Module],
    batches: Iterable,
    compress_block: Callable[[dict[str, tuple[torch.Tensor, int]]], None],
    *,
    progress: bool = True,
    fingerprint: dict | None = None,
    tune_block: Callable[[int, nn.Module, list, list], None] | None = None,
    tune_targets: str = "float",
    precision: torch.dtype | None = None,
    keep_hessians: bool = True,
) -> dict[str, tuple[torch.Tensor, int]]:
    """Runs the block-by-block pass; returns ``{layer: (X^T X / rows float64, rows)}`` as
    :func:`qruntime.calibration.stats.collect_stats` does, each block's Hessians taken after the earlier blocks
    were compressed.

    ``compress_block(hessians)`` is called once per block with the Hessians of that block's targets and
    must change those layers' weights in place (the next block is calibrated on the changed block's
    outputs). Undoing the change is the caller's business.

    ``tune_block(index, block, inputs, targets)``, when given, is called after ``compress_block`` with
    the block's calls on the calibration windows (``[(hidden_states, args, kwargs)]``) and the targets
    of its output; it may change the block's layers again. ``tune_targets="float"`` (the default): the
    float model's own output of that block (the float model runs on the same windows alongside), so the
    tuning also makes up for the error of the blocks before; ``"block"``: the uncompressed block's
    output for the calls it is given (the compressed model's hidden states).

    ``keep_hessians=False``: the result keeps, for a layer inside a block, only its Hessian's diagonal
    ``[K]`` once ``compress_block`` has had the full matrix, so that the Hessians held stay those of one
    block (for callers that need the full matrices only inside ``compress_block``).

    ``precision``: the dtype of the forwards' matmuls, X^T X and ``tune_block`` included
    (``torch.autocast``, see :func:`qruntime.calibration.stats.forward_dtype`; None: the model's own).

    Memory beyond the model (on the execution device when onloading, the Hessians on ``home``), for
    ``n`` windows of ``B x T`` tokens and width ``d``: the peak is at most the sum of

    - the hidden states at one block boundary, ``A = n * B * T * d`` x the model dtype's bytes: one copy
      (each window's states are replaced as the block's output on it is made); with ``tune_block`` two
      (the tuning targets);
    - the block arguments, one copy per distinct value (:class:`_SharedArguments`): for windows of one
      length, one window's (mask, position embeddings); each other length or padding adds its own;
    - one window's forward through one block (attention scores, MLP intermediate, autocast copies);
    - the Hessians returned, float64, ``8 * sum K^2`` over the targets of the blocks done so far (with
      ``keep_hessians=False``, as :func:`qruntime.compress` calls it: ``8 * sum K`` for their diagonals,
      and ``8 * sum K^2`` over one block's targets while it is compressed);
    - what ``compress_block`` holds: GPTQ (:func:`qruntime.quant.gptq.gptq_quantize`) three float64 ``K x K``
      of one layer at a time; ``compress`` each compressed layer's packed codes and dequantized weight
      (the float weights come back at the end): about one more copy of the targets' weights.

    Measured as the peak resident memory over ``compress(model, "w4a16-g128")`` (2 blocks, float32,
    glibc mapping large blocks (``MALLOC_MMAP_THRESHOLD_``) so the resident size follows the live
    tensors): d = 256, 64 windows of 256 tokens (A = 16 MiB): Llama 72.8 MiB, Falcon 66.8 MiB, Falcon
    with ALiBi 67.5 MiB, 1.04-1.05x the sum of A, the returned Hessians (22 / 19 MiB), the GPTQ workspace
    (24 MiB) and the weights (the other terms are small there); tests/test_calibration_memory.py checks
    the sum, with ``compress``'s ``keep_hessians=False`` (one block's Hessians and every layer's
    diagonal), on every decoder family of the support matrix. Before (arguments kept per window, next hidden states made beside the
    old): 95.2, 92.1 and 152.4 MiB. Falcon materializes its mask, ``[B, heads, T, T]`` float with ALiBi
    (``heads * T / d`` times a window's hidden states), ``[B, 1, T, T]`` bool without: at d = 64, 32
    windows of 1024 tokens (A = 8 MiB), Falcon with ALiBi took 545 MiB before, 45 MiB now.

    Raises:
        ValueError: no block list (see :func:`qruntime.plumbing.model.find_blocks`), no batch, non-finite
            activations, an unknown ``tune_targets``.
    """
    if tune_targets not in ("block", "float"):
        raise ValueError(f"tune_targets={tune_targets!r}: must be 'block' or 'float'")
    blocks = find_blocks(model).layers
    device = execution_device(model)
    onloader = current_onloader(model)
    names = {id(m): n for n, m in targets.items()}
    per_block = [{names[id(m)]: m for m in block.modules() if id(m) in names} for block in blocks]
    inside = {n for group in per_block for n in group}
    outside = {n: m for n, m in targets.items() if n not in inside}

    # 1. one dense pass per batch: every block's call, the first block's input, Hessians outside blocks
    rec = _record(model, blocks, outside, batches, device=device, precision=precision, onloader=onloader,
                  progress=progress)
    if fingerprint is not None:
        fingerprint.update(batches=len(rec.calls), tokens=rec.tokens, sha256=rec.digest.hexdigest(),
                           mode="block by block")

    # 2. block by block: calibrate on the current inputs, compress, recompute the outputs
    run = _Pass(
        result={n: ((rec.sums[n].to(torch.float64) / rec.rows[n]).to(home_device(model)), rec.rows[n])
                for n in rec.sums},
        home=home_device(model),  # where the Hessians go (not the execution device, when onloading)
        compress_block=compress_block, tune_block=tune_block, chain=tune_block is not None and tune_targets == "float",
        precision=lambda: autocast(device, precision), keep_hessians=keep_hessians,
    )
    hidden = rec.hidden
    reference = list(hidden) if run.chain else []  # the float model's hidden states (tune_targets="float")
    for i, block in enumerate(tqdm(blocks, desc="calibrate + compress blocks", unit="block", disable=not progress)):
        # onloading: the block stays on the execution device while it is calibrated, compressed and tuned
        with onloader.hold(block) if onloader is not None else nullcontext():
            hidden, reference = _one_block(i, block, per_block[i], hidden, reference, [c[i] for c in rec.calls], run)
    return run.result


@dataclass
class _Recording:
    """What the recording pass found: each batch's block calls, the first block's input hidden states,
    the Hessian sums of the targets outside the blocks, and the data's fingerprint."""

    calls: list = field(default_factory=list)  # per batch: each block's (args, kwargs)
    hidden: list = field(default_factory=list)  # per batch: block 0's input hidden states
    sums: dict = field(default_factory=dict)  # outside targets: X^T X (float32)
    rows: dict = field(default_factory=dict)
    tokens: int = 0
    digest: object = field(default_factory=hashlib.sha256)


@dataclass
class _Pass:
    """Step 2's settings, shared by every block."""

    result: dict  # name -> (Hessian float64 on ``home``, rows)
    home: torch.device
    compress_block: Callable
    tune_block: Callable | None
    chain: bool  # the float model's hidden states are carried along (tuning targets "float")
    precision: Callable  # () -> the context the forwards run in
    keep_hessians: bool


def _record(model: nn.Module, blocks, outside: Mapping[str, nn.Module], batches: Iterable, *, device, precision,
            onloader, progress: bool) -> _Recording:
    """Step 1 of :func:`blockwise_calibrate`: the recording forwards (see the module docstring)."""
    rec = _Recording()
    current: list = []
    shared = _SharedArguments()

    def record(module, args, kwargs):
        state = args[0] if args else kwargs["hidden_states"]
        index = len(current)  # of the block in this forward
        rest = {k: shared(v, (index, k)) for k, v in kwargs.items() if k != "hidden_states"}
        if not current:
            rec.hidden.append(state.detach())
        current.append((shared(tuple(args[1:]), (index, "*args")), rest))

    # After the first batch the blocks' compute is skipped where a pass-through can stand in for it (see
    # _pass_through): only their arguments are recorded here, and block 0's input comes before any block.
    forms: list = []  # first batch: each block's output in the form a pass-through would give, or None

    def learn(module, args, kwargs, output):
        if not rec.calls:
            forms.append(_output_form(args[0] if args else kwargs["hidden_states"], output))

    handles = [b.register_forward_pre_hook(record, with_kwargs=True) for b in blocks]
    handles += [b.register_forward_hook(learn, with_kwargs=True) for b in blocks]
    handles.append(blocks[-1].register_forward_hook(raise_stop))
    handles += _hessian_hooks(outside, rec.sums, rec.rows)
    skipping = False
    try:
        with ExitStack() as stack:
            for batch in tqdm(batches, desc="calibrate (record)", unit="batch", disable=not progress):
                if rec.calls and not skipping and not outside and len(forms) == len(blocks) and None not in forms:
                    stack.enter_context(_pass_through(blocks, forms))
                    if onloader is not None:  # blocks that compute nothing need not visit the device
                        stack.enter_context(onloader.left_home(blocks))
                    skipping = True
                current = []
                shared.new_forward()
                _record_forward(model, batch, device, precision)
                if len(current) != len(blocks):
                    raise ValueError(f"calibration: the forward pass called {len(current)} of the {len(blocks)} blocks")
                rec.calls.append(current)
                rec.tokens += hash_batch(batch, rec.digest)
    finally:
        for h in handles:
            h.remove()
        shared.new_forward()
    if not rec.calls:
        raise ValueError("calib_data yielded no batches")
    return rec


def _record_forward(model: nn.Module, batch, device, precision) -> None:
    """One recording forward, stopped after the last block."""
    try:
        inputs = model_inputs(batch, device)
    except TypeError as exc:
        raise TypeError(f"calibration {exc}") from None
    check_token_ids(model, inputs)
    try:
        with autocast(device, precision):
            model_forward(model, inputs)
    except StopForward:
        pass


class _SharedArguments:
    """Keeps one copy of each block argument that repeats from batch to batch in the recording pass.

    A model builds its attention mask, position embeddings and position ids afresh for every forward,
    equal from window to window of one length; kept per batch, they would cost more than the hidden
    states themselves: Falcon with ALiBi bakes the bias into a float mask [B, heads, T, T] (heads * T / d
    times a batch's hidden states, 32x for Falcon-RW-1B at T = 2048), Bloom a float [B, 1, T, T] mask,
    Llama's cos and sin are 2 * head_dim / d of them.

    ``shared(value, path)`` returns a recorded argument (a tensor, or a tuple, list or dict of them) with
    each tensor equal in shape, dtype and values to the one kept for the same ``path`` (block index,
    argument name, position inside it) in the previous forward replaced by that one, so the recording
    holds one copy per distinct argument. A tensor object met again in the same forward (every block gets
    the same mask) is looked up, not compared again. Call :meth:`new_forward` before each forward."""

    def __init__(self):
        self.last: dict[tuple, torch.Tensor] = {}  # path -> the tensor kept for it in the last forward
        # id -> (the tensor, what it became) in this forward; the tensor is held so its id is not reused
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_forward(self) -> None:
        self.seen.clear()

    def __call__(self, value, path: tuple):
        if isinstance(value, torch.Tensor):
            return self._tensor(value, path)
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
            return type(value)(*(self(v, path + (j,)) for j, v in enumerate(value)))
        if isinstance(value, (tuple, list)):
            return type(value)(self(v, path + (j,)) for j, v in enumerate(value))
        if isinstance(value, dict):
            return {k: self(v, path + (k,)) for k, v in value.items()}
        return value

    def _tensor(self, t: torch.Tensor, path: tuple) -> torch.Tensor:
        hit = self.seen.get(id(t))
        if hit is not None and hit[0] is t:
            kept = hit[1]
        else:
            last = self.last.get(path)
            same = (last is not None and t.layout == torch.strided and not t.is_meta and last.shape == t.shape
                    and last.dtype == t.dtype and last.device == t.device and torch.equal(last, t))
            kept = last if same else t
            self.seen[id(t)] = (t, kept)
        self.last[path] = kept
        return kept


def _output_form(state, output):
    """How a block's ``output`` relates to its input hidden ``state``, when a pass-through returning
    ``state`` in the same form could stand in for the block: ``"tensor"`` (the output is a tensor of the
    state's shape) or ``(type, n)`` (a tuple/list of n whose first item is such a tensor, the rest None:
    no attention weights, caches or position biases the model passes on). Else None."""
    if not isinstance(state, torch.Tensor):
        return None
    if isinstance(output, torch.Tensor):
        return "tensor" if output.shape == state.shape else None
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor) \
            and output[0].shape == state.shape and all(o is None for o in output[1:]):
        return type(output), len(output)
    return None


@contextmanager
def _pass_through(blocks, forms):
    """Replaces each block's forward by one returning its input hidden states in the block's output form
    (:func:`_output_form`), restoring the forwards on exit (an instance-level forward, e.g. accelerate's,
    included). Hooks still run: the recording pass keeps every block's arguments at a fraction of the
    compute."""
    saved = [b.__dict__.get("forward") for b in blocks]

    def make(form):
        def forward(*args, **kwargs):
            state = args[0] if args else kwargs["hidden_states"]
            return state if form == "tensor" else form[0]((state,) + (None,) * (form[1] - 1))

        return forward

    try:
        for block, form in zip(blocks, forms):
            block.forward = make(form)
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                del block.forward
            else:
                block.forward = old


@torch.no_grad()
def _one_block(i: int, block: nn.Module, group: dict, hidden: list, reference: list, block_calls: list, run: _Pass):
    """Step 2 of :func:`blockwise_calibrate` for block ``i`` (its targets ``group``; ``block_calls``: its
    ``(args, kwargs)`` per window): collects their Hessians (into ``run.result``, on ``run.home``), compresses and
    tunes them, and returns the next hidden states and the float model's (``reference``, with ``run.chain``).
    ``hidden`` and ``reference`` are updated in place, window by window, so a window's old states are
    freed as its new ones are made (one copy of the hidden states, not two).
    ``run.precision()``: the context the block's forwards and its tuning run in."""
    precision, tune_block, chain = run.precision, run.tune_block, run.chain
    if group:
        b_sums: dict[str, torch.Tensor] = {}
        b_rows: dict[str, int] = {}
        float_out: list[torch.Tensor] = []  # the block's outputs before compression (tuning targets)
        handles = _hessian_hooks(group, b_sums, b_rows)
        try:
            with precision():
                for h, (args, kwargs) in zip(hidden, block_calls):
                    out = block(h, *args, **kwargs)
                    if tune_block is not None and not chain:
                        float_out.append(first(out).detach().to(h.dtype))
        finally:
            for hd in handles:
                hd.remove()
    if chain:
        _advance(block, reference, block_calls, precision)
        float_out = list(reference)  # a copy of the list: the next block replaces reference's entries
    if group:
        # float32 sums -> float64 Hessians, each sum dropped as its Hessian is made
        hessians = {n: (b_sums.pop(n).to(torch.float64) / b_rows[n], b_rows[n]) for n in list(b_sums)}
        run.result.update({n: ((h if run.keep_hessians else h.diagonal().clone()).to(run.home), r)
                           for n, (h, r) in hessians.items()})
        run.compress_block(hessians)
        del hessians
        if tune_block is not None:
            with precision():  # tuning's forwards and backwards too; its parameters and loss stay float32
                tune_block(i, block, [(h, args, kwargs) for h, (args, kwargs) in zip(hidden, block_calls)], float_out)
        float_out = None
    _advance(block, hidden, block_calls, precision)
    return hidden, reference


def _advance(block, states: list, block_calls, precision) -> None:
    """Replaces each window's hidden states in ``states`` by ``block``'s output on them (detached, in
    their own dtype: a block under autocast may return the lower one), one window at a time."""
    with precision():
        for j, (args, kwargs) in enumerate(block_calls):
            h = states[j]
            states[j] = first(block(h, *args, **kwargs)).detach().to(h.dtype)
            del h
