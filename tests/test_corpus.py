"""The builtin corpus: English prose from the standard library's docstrings, built once."""

from utils.data.corpus import _prose_paragraphs, build_corpus


def test_prose_paragraphs_drop_code_and_join_wrapped_lines():
    docstring = """Return the sum of the numbers.

    The numbers are added
    from left to right.

    >>> add(1, 2)
    3

    x = 1
    """
    assert _prose_paragraphs(docstring) == ["Return the sum of the numbers.",
                                            "The numbers are added from left to right."]


def test_build_corpus_is_large_english_and_cached(tmp_path):
    path = build_corpus("python_docstrings", cache_dir=str(tmp_path))
    text = path.read_text(encoding="utf-8")
    assert len(text) > 1_000_000
    words = text.lower().split()
    for common in ("the", "return", "file", "object"):
        assert words.count(common) > 200
    assert ">>>" not in text
    mtime = path.stat().st_mtime_ns
    assert build_corpus("python_docstrings", cache_dir=str(tmp_path)) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not list(tmp_path.glob("corpora/*.tmp*"))
