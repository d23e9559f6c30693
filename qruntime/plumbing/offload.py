"""Sequential onloading: calibrate a model larger than the accelerator's memory.

``with onloaded(model, "cuda"):`` leaves the model's weights where they are (their *home*, usually CPU
RAM) and moves each piece of it to the execution device only while that piece runs: every block of the
model's block list (:func:`qruntime.plumbing.model.find_blocks`), and every other module that holds parameters
or buffers of its own (embeddings, final norm, output head, rotary tables). A forward pass of the whole
model then needs, on the device, one piece's weights at a time plus the activations. The block-by-block
calibration (:mod:`qruntime.calibration.blockwise`) *holds* one block on the device while it calibrates, compresses
and tunes it (:meth:`Onloader.hold`), so the block moves once, not once per window.

Inside the context :func:`execution_device` gives the device to put inputs on; outside it, the device of
the model's first parameter. ``compress(model, ..., device="cuda")`` uses this for its calibration
passes; the compressed layers come back to the home device.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .model import find_blocks

__all__ = ["onloaded", "execution_device", "home_device", "current_onloader", "check_device", "Onloader"]

_ATTR = "_qruntime_onloader"


def execution_device(model: nn.Module) -> torch.device:
    """Where ``model``'s inputs go: the onloading device inside :func:`onloaded`, else the device of its
    first parameter (CPU for a model without parameters)."""
    onloader = getattr(model, _ATTR, None)
    if onloader is not None:
        return onloader.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device``, or a ValueError that says what is wrong with it."""
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r}: not a torch device ({exc})") from None
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine")
    if out.type == "meta":
        raise ValueError(f"device={device!r}: the meta device cannot run a model")
    return out


def current_onloader(model: nn.Module) -> "Onloader | None":
    """The :class:`Onloader` running ``model``, inside :func:`onloaded`; else None."""
    return getattr(model, _ATTR, None)


def home_device(model: nn.Module) -> torch.device:
    """Where ``model``'s weights live between uses (inside :func:`onloaded`: not the execution device)."""
    onloader = getattr(model, _ATTR, None)
    if onloader is not None:
        return onloader.home
    return execution_device(model)


def _owns_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


class Onloader:
    """The hooks of :func:`onloaded`. ``units``: the modules moved as one piece each."""

    def __init__(self, model: nn.Module, device: torch.device | str) -> None:

        self.device = torch.device(device)
        first = next(model.parameters(), None)
        if first is None:
            raise ValueError(f"{type(model).__name__} has no parameters to onload")
        self.home = first.device
        if self.home.type == "meta":
            raise ValueError("onloading: the model's weights are on the meta device (not loaded)")
        try:
            blocks = list(find_blocks(model).layers)
        except ValueError:
            blocks = []
        inside = {id(m) for b in blocks for m in b.modules()}
        self.units: list[nn.Module] = list(blocks) + [
            m for m in model.modules() if id(m) not in inside and _owns_tensors(m)]
        self.held: set[int] = set()
        self.moves = 0  # units moved to the device so far (tests, and the report)
        self._handles: list = []

    def _to_device(self, module: nn.Module, *args) -> None:
        if id(module) not in self.held:
            module.to(self.device)
            self.moves += 1

    def _to_home(self, module: nn.Module, *args) -> None:
        if id(module) not in self.held:
            module.to(self.home)

    def attach(self, model: nn.Module) -> None:
        for unit in self.units:
            self._handles.append(unit.register_forward_pre_hook(self._to_device))
            self._handles.append(unit.register_forward_hook(self._to_home))
        setattr(model, _ATTR, self)

    def detach(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if getattr(model, _ATTR, None) is self:
            delattr(model, _ATTR)

    @contextmanager
    def hold(self, module: nn.Module) -> Iterator[nn.Module]:
        """Keeps ``module`` (a unit) on the device for the duration, then sends it home, with anything
        assigned into it meanwhile (e.g. compressed weights)."""
        module.to(self.device)
        self.moves += 1
        self.held.add(id(module))
        try:
            yield module
        finally:
            self.held.discard(id(module))
            module.to(self.home)

    @contextmanager
    def left_home(self, modules) -> Iterator[None]:
        """``modules`` (units) stay at home when they run, for the duration: for modules whose forward
        uses none of their weights (the pass-through of the recording pass, :mod:`qruntime.calibration.blockwise`)."""
        ids = {id(m) for m in modules} - self.held
        self.held |= ids
        try:
            yield
        finally:
            self.held -= ids


@contextmanager
def onloaded(model: nn.Module, device: torch.device | str | None) -> Iterator[Onloader | None]:
    """Runs ``model`` on ``device`` one piece at a time (see the module docstring); ``None``: nothing
    changes and this yields None. The device the model is already on works too (every move is then a
    no-op). Afterwards the whole model is on its home device (that of its first parameter before), on
    every path."""
    if device is None:
        yield None
        return
    device = check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if getattr(model, _ATTR, None) is not None:
        raise RuntimeError("onloaded: the model is already being onloaded")
    onloader = Onloader(model, device)
    onloader.attach(model)
    try:
        yield onloader
    finally:
        onloader.detach(model)
        model.to(onloader.home)
