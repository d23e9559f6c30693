"""The support matrix (issue 33): every family of :mod:`support_matrix` through every stage of compress(),
each cell either passing its check or refused up front; docs/models.md is rendered from the same cells."""
from __future__ import annotations

from pathlib import Path

import pytest

import support_matrix as sm

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


@pytest.mark.parametrize("stage", list(sm.STAGES))
@pytest.mark.parametrize("family", list(sm.FAMILIES))
def test_cell_works_checked_or_is_refused_up_front(family, stage):
    cell = sm.cell(family, stage)  # a failed check raises
    if cell is None:
        assert stage in ("generate", "decoder") and sm.kind(family) == "encoder"
    elif not cell.ok:
        assert family.split(" ")[0] in cell.text.lower() and stage.split(" ")[0].lower() in cell.text.lower(), \
            f"a refusal must name the family and the stage: {cell.text!r}"


def test_models_page_matches_the_checks():
    rendered = sm.render(sm.all_cells())
    assert DOC.read_text() == rendered, \
        "docs/models.md is out of date: run `python tests/support_matrix.py --write docs/models.md`"
