"""The generated measurement pages (docs/results/*.md) match bench/results/ and carry no lab-notebook ids."""
import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PAGES_DIR = ROOT / "docs" / "results"

ISSUE_NUMBER = re.compile(r"#\d+|\bissue \d+", re.IGNORECASE)
# a 7-40 character hex word with at least one digit and one letter, as a whole word
COMMIT_HASH = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b", re.IGNORECASE)
FILE_REFERENCE = re.compile(r"bench/results/([\w.+-]+\.json)")


def _load_renderer():
    spec = importlib.util.spec_from_file_location("render_results", ROOT / "bench" / "render_results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rendered():
    return _load_renderer().render_all()


def _pages():
    return sorted(PAGES_DIR.glob("*.md"))


def test_committed_pages_equal_a_fresh_render(rendered):
    on_disk = {str(p.relative_to(ROOT)): p.read_text() for p in _pages()}
    assert sorted(on_disk) == sorted(rendered), "pages missing or not generated: run bench/render_results.py"
    stale = [rel for rel, text in rendered.items() if on_disk[rel] != text]
    assert not stale, f"stale pages (run python bench/render_results.py): {stale}"


def test_every_result_file_is_on_a_page_and_every_named_file_exists():
    named = {name for page in _pages() for name in FILE_REFERENCE.findall(page.read_text())}
    on_disk = {p.name for p in RESULTS.glob("*.json")}
    assert on_disk - named == set(), "result files on no page"
    assert named - on_disk == set(), "pages name files that do not exist"


def test_pattern_for_hashes_ignores_ordinary_words():
    for text in ("decade", "added", "2026-11-28", "4096x4096", "1e-3", "avx512_vnni", "0.00349", "cafe"):
        assert not COMMIT_HASH.search(text), text
    for text in ("ran e4ac3b3 here", "commit 2cf23cd.", "(bbb2824)"):
        assert COMMIT_HASH.search(text), text


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.name)
def test_pages_carry_no_issue_numbers_or_commit_hashes(page):
    text = page.read_text()
    assert ISSUE_NUMBER.findall(text) == []
    assert COMMIT_HASH.findall(text) == []
