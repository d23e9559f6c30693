"""parse_weight_recipe against the 400-character regex it replaced (copied here as the oracle): every name the
regex read gives the same fields; suffixes may now come in any order; errors name the bad token."""
from __future__ import annotations

import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qruntime.recipes.grammar import WeightRecipe, parse_weight_recipe

# copied verbatim from the former qruntime/config.py (the regex the preset names were read with)
_PRESET_RE = re.compile(
    r"^w(?P<bits>8|4)a(?P<abits>16|8)(?:-g(?P<group>\d+))?(?:-(?P<sym>sym|asym))?(?:-(?P<method>rtn|gptq))?(?:-(?P<clip>mse|clip))?(?:-tune(?P<tune>\d+)?(?P<tuneflag>)(?P<round>-round)?)?(?P<awq>-awq)?(?:(?P<sqflag>-sq(?P<sq>0?\.\d+|auto)?)|(?P<nosq>-nosq))?(?:-emb(?P<emb>8|4))?(?:-budget(?P<budget>\d*\.?\d+)(?P<float>-float)?)?$"
)


def old_parse(name: str) -> WeightRecipe | None:
    """What the old regex extracts from ``name``, as a WeightRecipe (None: the regex rejects it)."""
    m = _PRESET_RE.match(name)
    if m is None:
        return None
    return WeightRecipe(
        bits=int(m["bits"]), act_bits=int(m["abits"]), group=int(m["group"]) if m["group"] else None,
        sym=m["sym"], method=m["method"], clip=m["clip"],
        tune=None if m["tuneflag"] is None else (m["tune"] or ""), round=bool(m["round"]), awq=bool(m["awq"]),
        sq=None if m["sqflag"] is None else (m["sq"] or ""), nosq=bool(m["nosq"]), emb=m["emb"],
        budget=m["budget"], float=bool(m["float"]),
    )


def canonical_units(r: WeightRecipe) -> list[str]:
    """The suffixes of ``r`` in the old regex's order, "-tune-round" and "-budget<x>-float" as one unit."""
    units = [f"g{r.group}" if r.group is not None else None, r.sym, r.method, r.clip,
             None if r.tune is None else f"tune{r.tune}" + ("-round" if r.round else ""),
             "awq" if r.awq else None,
             "nosq" if r.nosq else (None if r.sq is None else f"sq{r.sq}"),
             None if r.emb is None else f"emb{r.emb}",
             None if r.budget is None else f"budget{r.budget}" + ("-float" if r.float else "")]
    return [u for u in units if u is not None]


def join(head: str, units) -> str:
    return "-".join([head, *units])


# ---------------------------------------------------------------- 1. every canonical combination

HEADS = ["w8a16", "w8a8", "w4a16", "w4a8"]  # w4a8 is valid syntax (parse_preset rejects it later)
CHOICES = [  # one list per unit of the canonical order; None: the unit is left out
    [None, "g32", "g128"],
    [None, "sym", "asym"],
    [None, "rtn", "gptq"],
    [None, "mse", "clip"],
    [None, "tune", "tune-round", "tune16", "tune16-round"],
    [None, "awq"],
    [None, "sq", "sq0.75", "sq.5", "sqauto", "nosq"],
    [None, "emb8", "emb4"],
    [None, "budget0.02", "budget0.02-float", "budget.1", "budget.1-float"],
]


def canonical_names():
    for head, *units in itertools.product(HEADS, *CHOICES):
        yield join(head, [u for u in units if u is not None])


def test_canonical_names_match_old_regex():
    count = 0
    for name in canonical_names():
        old = old_parse(name)
        assert old is not None, name  # the enumeration stays inside the old language
        assert parse_weight_recipe(name) == old, name
        count += 1
    assert count == len(HEADS) * len(list(itertools.product(*CHOICES))) == 291_600


@pytest.mark.parametrize("name", [
    "w8a16", "w8a8", "w4a16", "w4a8", "w4a16-g0", "w4a16-g007", "w4a16-tune0", "w4a16-tune007-round",
    "w8a8-sq0.5", "w8a8-sq.05", "w4a16-budget2", "w4a16-budget10.25-float", "w4a16-budget0",
    "w4a16-g128-asym-gptq-clip-tune-round-awq-emb4-budget0.02-float",
])
def test_odd_but_accepted_names_match_old_regex(name):
    """Values the regex takes although parse_preset rejects or normalizes them later (g0, tune0, ...)."""
    assert old_parse(name) is not None
    assert parse_weight_recipe(name) == old_parse(name)


def test_recipe_fields():
    r = parse_weight_recipe("w4a16-g128-asym-gptq-clip-tune16-round-awq-emb4-budget.1-float")
    assert r == WeightRecipe(bits=4, act_bits=16, group=128, sym="asym", method="gptq", clip="clip", tune="16",
                             round=True, awq=True, emb="4", budget=".1", float=True)
    assert parse_weight_recipe("w8a8-sq") == WeightRecipe(bits=8, act_bits=8, sq="")
    assert parse_weight_recipe("w8a8-sqauto").sq == "auto"
    assert parse_weight_recipe("w8a8-nosq") == WeightRecipe(bits=8, act_bits=8, nosq=True)
    assert parse_weight_recipe("w4a16-tune").tune == ""
    assert parse_weight_recipe("w4a16") == WeightRecipe(bits=4, act_bits=16)


# ---------------------------------------------------------------- 2. any order

FULL = [
    "w4a16-g128-asym-gptq-clip-tune16-round-awq-emb4-budget.1-float",
    "w8a8-g32-sym-rtn-mse-tune-sq0.75-emb8-budget0.02",
    "w8a16-gptq-clip-tune-round-awq-budget0.02-float",
    "w8a8-rtn-nosq-emb8",
]


@pytest.mark.parametrize("name", FULL)
def test_any_order_gives_the_canonical_recipe(name):
    want = parse_weight_recipe(name)
    units = canonical_units(want)
    assert join(name.split("-")[0], units) == name
    perms = list(itertools.permutations(units)) if len(units) <= 7 else \
        [random.Random(i).sample(units, len(units)) for i in range(2000)]
    rejected_by_old = 0
    for perm in perms:
        shuffled = join(name.split("-")[0], perm)
        assert parse_weight_recipe(shuffled) == want, shuffled
        rejected_by_old += old_parse(shuffled) is None
    assert rejected_by_old >= len(perms) - 1  # only the canonical order was accepted before


def test_every_pair_in_reverse_order():
    """Each two kinds in the order opposite to the old one."""
    head = "w8a8"
    units = ["g64", "asym", "gptq", "mse", "tune8-round", "awq", "sqauto", "emb4", "budget3-float"]
    for a, b in itertools.combinations(units, 2):
        name = join(head, [b, a])
        assert old_parse(name) is None
        assert parse_weight_recipe(name) == old_parse(join(head, [a, b])), name


# ---------------------------------------------------------------- 3. rejections

@pytest.mark.parametrize("name, words", [
    # each kind at most once
    ("w4a16-g32-g64", ["'-g64' and '-g32'", "group size"]),
    ("w4a16-sym-asym", ["'-asym' and '-sym'", "symmetry"]),
    ("w4a16-gptq-rtn", ["'-rtn' and '-gptq' both give the rounding"]),
    ("w4a16-rtn-gptq", ["'-gptq' and '-rtn'", "rounding"]),
    ("w4a16-mse-clip", ["'-clip' and '-mse'"]),
    ("w4a16-tune-tune32", ["'-tune32' and '-tune'"]),
    ("w8a8-sq-nosq", ["'-nosq' and '-sq'", "SmoothQuant"]),
    ("w8a8-nosq-sq0.75", ["'-sq0.75' and '-nosq'"]),
    ("w4a16-emb8-emb4", ["'-emb4' and '-emb8'", "embedding"]),
    ("w4a16-budget1-budget2", ["'-budget2' and '-budget1'"]),
    ("w4a16-awq-awq", ["'-awq' given twice"]),
    ("w4a16-tune-round-round", ["'-round' given twice"]),
    # unknown or misspelled tokens
    ("w4a16-g128-foo", ["unknown suffix '-foo' (expected one of -g<group>,", "-budget<x>, -float)"]),
    ("w4a16-int4", ["unknown suffix '-int4'"]),
    ("w4a16-G128", ["unknown suffix '-G128'"]),
    ("w4a16-g", ["bad suffix '-g'", "-g<group>"]),
    ("w4a16-g12a", ["bad suffix '-g12a'", "-g<group>"]),
    ("w4a16-gptq4", ["bad suffix '-gptq4'", "-rtn|-gptq"]),
    ("w4a16-budget", ["bad suffix '-budget'", "-budget<x>"]),
    ("w4a16-budget0.", ["bad suffix '-budget0.'"]),
    ("w4a16-budget1.2.3", ["bad suffix '-budget1.2.3'"]),
    ("w8a8-sq1", ["bad suffix '-sq1'", "-sq["]),
    ("w8a8-sq1.5", ["bad suffix '-sq1.5'"]),
    ("w4a16-emb2", ["bad suffix '-emb2'", "-emb8|-emb4"]),
    ("w4a16-tunex", ["bad suffix '-tunex'", "-tune[<steps>]"]),
    ("w4a16-rounding", ["bad suffix '-rounding'", "-round"]),
    ("w4a16-budget1-floaty", ["bad suffix '-floaty'", "-float"]),
    # qualifiers out of place
    ("w4a16-round", ["'-round' must follow '-tune'"]),
    ("w4a16-round-tune", ["'-round' must follow '-tune'"]),
    ("w4a16-tune-awq-round", ["'-round' must follow '-tune'"]),
    ("w4a16-float", ["'-float' must follow '-budget'"]),
    ("w4a16-budget1-awq-float", ["'-float' must follow '-budget'"]),
    ("w4a16-float-budget1", ["'-float' must follow '-budget'"]),
    # empty tokens
    ("w8a16--gptq", ["empty suffix '-'"]),
    ("w8a16-", ["empty suffix '-'"]),
    ("w8a16-gptq-", ["empty suffix '-'"]),
    # bad heads
    ("w3a16", ["bad head 'w3a16'", "w<bits>a<act bits>"]),
    ("w8a4", ["bad head 'w8a4'"]),
    ("x8a16", ["bad head 'x8a16'"]),
    ("w8a16x-gptq", ["bad head 'w8a16x'"]),
    ("w8", ["bad head 'w8'"]),
    ("", ["bad head ''"]),
    ("-w8a16", ["bad head ''"]),
])
def test_rejected(name, words):
    assert old_parse(name) is None
    with pytest.raises(ValueError) as info:
        parse_weight_recipe(name)
    message = str(info.value)
    assert message.startswith(f"unknown preset {name!r}: ")
    for word in words:
        assert word in message, (word, message)


# ---------------------------------------------------------------- fuzz

TOKENS = ["g32", "g128", "g", "g0", "g1x", "sym", "asym", "rtn", "gptq", "mse", "clip", "tune", "tune16", "tune0",
          "round", "awq", "sq", "sq0.75", "sq.5", "sqauto", "sq1", "nosq", "emb8", "emb4", "emb2", "budget0.02",
          "budget.1", "budget", "budget0.", "float", "", "foo", "-", "tune-round", "budget2-float"]
FUZZ_HEADS = ["w8a16", "w8a8", "w4a16", "w4a8", "w3a16", "x8a16", "w8a4", ""]


def check_against_old(name: str) -> None:
    """The old regex's recipe where it accepts ``name``; else a ValueError naming ``name``, or a recipe
    whose canonical spelling the old regex accepts with the same meaning."""
    old = old_parse(name)
    if old is not None:
        assert parse_weight_recipe(name) == old, name
        return
    try:
        new = parse_weight_recipe(name)
    except ValueError as e:
        assert str(e).startswith(f"unknown preset {name!r}: "), (name, e)
        return
    canonical = join(f"w{new.bits}a{new.act_bits}", canonical_units(new))
    assert old_parse(canonical) == new, (name, canonical)


@settings(max_examples=3000, derandomize=True, deadline=None)
@given(st.sampled_from(FUZZ_HEADS), st.lists(st.sampled_from(TOKENS), max_size=9))
def test_fuzz_token_strings(head, tokens):
    check_against_old(join(head, tokens))


@settings(max_examples=3000, derandomize=True, deadline=None)
@given(st.sampled_from(HEADS), st.lists(st.sampled_from(CHOICES), max_size=9).flatmap(
    lambda kinds: st.tuples(*[st.sampled_from(k[1:]) for k in kinds])))
def test_fuzz_known_units(head, units):
    """Mostly well-formed names: units of random kinds, repeated or in any order."""
    check_against_old(join(head, units))


def test_fuzz_characters():
    """Random strings over the characters of the vocabulary (seeded): agree wherever the old regex matches."""
    rng = random.Random(0)
    alphabet = "w84a16-gsymtnpqcluerobdf.0275x"
    matched = 0
    for _ in range(20_000):
        prefix = rng.choice(HEADS + [""])
        name = prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        check_against_old(name)
        matched += old_parse(name) is not None
    assert matched > 100
