"""The syntax of a weight recipe name such as ``w4a16-g128-gptq-clip-tune-awq-budget0.02`` (read by
:func:`qruntime.recipes.presets.parse_preset`).

A name is a head ``w<bits>a<act bits>`` (bits 8 or 4, act bits 16 or 8) followed by "-"-separated
suffixes, each recognised by one entry of :data:`_SUFFIXES`. The suffixes may come in any order, but
each kind at most once (``-sym`` / ``-asym`` are one kind, as are ``-rtn`` / ``-gptq``,
``-mse`` / ``-clip`` and ``-sq`` / ``-nosq``). Two suffixes qualify the one before them:
``-round`` must directly follow ``-tune[<steps>]`` and ``-float`` must directly follow ``-budget<x>``.

This module checks the syntax only and keeps the text of each value; what the values mean, and which
combinations make sense (``a8`` needs ``w8``, ``-sq`` needs ``a8``, ...), is ``parse_preset``'s business.

Imports: nothing from qruntime.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

__all__ = ["WeightRecipe", "parse_weight_recipe"]


@dataclass(frozen=True)
class WeightRecipe:
    """What a weight recipe name says, field by field (None / False: the suffix is absent)."""

    bits: int  # 8 | 4
    act_bits: int  # 16 | 8
    group: int | None = None  # "-g<group>"
    sym: str | None = None  # "sym" | "asym"
    method: str | None = None  # "rtn" | "gptq"
    clip: str | None = None  # "mse" | "clip"
    tune: str | None = None  # the steps' digits of "-tune<steps>"; "" for a bare "-tune"
    round: bool = False  # "-round" (after "-tune")
    awq: bool = False  # "-awq"
    sq: str | None = None  # the alpha text of "-sq<alpha>" ("0.75", ".5", "auto"); "" for a bare "-sq"
    nosq: bool = False  # "-nosq"
    emb: str | None = None  # "8" | "4" of "-emb8" / "-emb4"
    budget: str | None = None  # the number text of "-budget<x>"
    float: bool = False  # "-float" (after "-budget<x>")


@dataclass(frozen=True)
class _Suffix:
    """One kind of suffix: how its tokens look (without the leading "-") and the fields they set."""

    kind: str  # what it gives, for error messages ("both give the rounding")
    pattern: str  # must match the whole token
    fields: Callable[[re.Match], dict]  # the WeightRecipe fields a matching token sets
    spelling: str  # how it is written, for error messages
    keywords: tuple[str, ...]  # the words a token of this kind starts with (to explain a misspelling)
    after: str | None = None  # the kind of suffix it must directly follow


_SUFFIXES: tuple[_Suffix, ...] = (
    _Suffix("group size", r"g(\d+)", lambda m: {"group": int(m[1])}, "-g<group>", ("g",)),
    _Suffix("symmetry", r"sym|asym", lambda m: {"sym": m[0]}, "-sym|-asym", ("sym", "asym")),
    _Suffix("rounding", r"rtn|gptq", lambda m: {"method": m[0]}, "-rtn|-gptq", ("rtn", "gptq")),
    _Suffix("clipping", r"mse|clip", lambda m: {"clip": m[0]}, "-mse|-clip", ("mse", "clip")),
    _Suffix("tuning", r"tune(\d*)", lambda m: {"tune": m[1]}, "-tune[<steps>]", ("tune",)),
    _Suffix("learned rounding", r"round", lambda m: {"round": True}, "-round", ("round",), after="tuning"),
    _Suffix("AWQ", r"awq", lambda m: {"awq": True}, "-awq", ("awq",)),
    _Suffix("SmoothQuant setting", r"sq(0?\.\d+|auto)?|nosq",
            lambda m: {"nosq": True} if m[0] == "nosq" else {"sq": m[1] or ""},
            "-sq[0.<digits>|auto]|-nosq", ("sq", "nosq")),
    _Suffix("embedding format", r"emb(8|4)", lambda m: {"emb": m[1]}, "-emb8|-emb4", ("emb",)),
    _Suffix("budget", r"budget(\d*\.?\d+)", lambda m: {"budget": m[1]}, "-budget<x>", ("budget",)),
    _Suffix("fallback", r"float", lambda m: {"float": True}, "-float", ("float",), after="budget"),
)

_HEAD_RE = re.compile(r"w(8|4)a(16|8)")
_EXPECTED = ", ".join(s.spelling for s in _SUFFIXES)


def parse_weight_recipe(name: str) -> WeightRecipe:
    """The :class:`WeightRecipe` of ``name`` (already stripped and lower-cased), e.g. ``w4a16-g128-rtn``.

    Raises ValueError, naming the offending part of ``name``, when it is not a head followed by
    suffixes as described in the module docstring."""
    head, *tokens = name.split("-")
    fields = _parse_head(name, head)
    seen: dict[str, str] = {}  # kind -> its token
    previous: str | None = None  # the kind of the token before
    for token in tokens:
        suffix, match = _match_suffix(name, token)
        _check_place(name, token, suffix, seen, previous)
        seen[suffix.kind] = token
        previous = suffix.kind
        fields.update(suffix.fields(match))
    return WeightRecipe(**fields)


def _parse_head(name: str, head: str) -> dict:
    """The ``bits`` and ``act_bits`` of the head ``w<bits>a<act bits>``."""
    m = _HEAD_RE.fullmatch(head)
    if m is None:
        raise ValueError(f"unknown preset {name!r}: bad head {head!r} (expected 'w<bits>a<act bits>' with bits "
                         "8 or 4 and act bits 16 or 8, e.g. 'w8a16', 'w8a8', 'w4a16')")
    return {"bits": int(m[1]), "act_bits": int(m[2])}


def _match_suffix(name: str, token: str) -> tuple[_Suffix, re.Match]:
    """The suffix kind that ``token`` (a suffix without its "-") is one of, and the match of its pattern."""
    for suffix in _SUFFIXES:
        m = re.fullmatch(suffix.pattern, token)
        if m is not None:
            return suffix, m
    if not token:
        raise ValueError(f"unknown preset {name!r}: empty suffix '-' (a '-' followed by another '-' or by nothing)")
    near = [(len(k), s) for s in _SUFFIXES for k in s.keywords if token.startswith(k)]
    if near:  # misspelled value of a known kind: explain that kind only
        suffix = max(near, key=lambda n: n[0])[1]
        raise ValueError(f"unknown preset {name!r}: bad suffix '-{token}' (expected '{suffix.spelling}')")
    raise ValueError(f"unknown preset {name!r}: unknown suffix '-{token}' (expected one of {_EXPECTED})")


def _check_place(name: str, token: str, suffix: _Suffix, seen: dict[str, str], previous: str | None) -> None:
    """Raises if the kind of ``token`` was given before, or it does not follow the suffix it qualifies."""
    first = seen.get(suffix.kind)
    if first == token:
        raise ValueError(f"unknown preset {name!r}: '-{token}' given twice")
    if first is not None:
        raise ValueError(f"unknown preset {name!r}: '-{token}' and '-{first}' both give the {suffix.kind}")
    if suffix.after is not None and previous != suffix.after:
        wanted = next(s for s in _SUFFIXES if s.kind == suffix.after)
        raise ValueError(f"unknown preset {name!r}: '-{token}' must follow '-{wanted.keywords[0]}' "
                         f"(directly: '{wanted.spelling}-{token}')")
