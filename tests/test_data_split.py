"""The held-out text is never in the training text (issue 23, item 7), for every embedded source.

The checks are independent of ``data.dedupe``'s own unit where they can be: a held-out paragraph
is searched as a SUBSTRING of the whole training text (pydoc: all of them; stdlib: the longest
ones), which also catches a paragraph quoted inside a longer one.
"""
from __future__ import annotations

import re

import pytest

from ecospa.io import data

EMBEDDED = ("pydoc", "stdlib")
MIN_CHARS = 40  # shorter paragraphs ("Notes:", "else:") are common words, not leaked text


def _long_paragraphs(text: str, n: int = MIN_CHARS) -> list:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) >= n]


def test_pydoc_val_paragraphs_are_not_in_train():
    """Before the fix, 14 of 139 val paragraphs (8.5% of val) were verbatim in train: the
    ``compound`` topic (train) holds the ``if``/``for``/``else`` topics (val)."""
    train, val = data.corpus("pydoc", "train"), data.corpus("pydoc", "val")
    held = _long_paragraphs(val)
    assert len(held) > 100  # the split still holds out real text
    leaked = [p[:60] for p in held if p in train]
    assert not leaked, f"{len(leaked)} pydoc val paragraphs occur in pydoc train: {leaked[:3]}"


def test_stdlib_val_paragraphs_are_not_in_train():
    train, val = data.corpus("stdlib", "train"), data.corpus("stdlib", "val")
    keys = {data.paragraph_key(p) for p in data.paragraphs(train)}
    held = _long_paragraphs(val)
    assert not [p for p in held if data.paragraph_key(p) in keys]
    longest = sorted(held, key=len, reverse=True)[:150]  # substring search of the whole train text
    assert not [p[:60] for p in longest if p in train]


def test_stdlib_leaves_out_the_pydoc_text():
    """``pydoc_data/topics.py`` IS the pydoc source: with it, ``--data stdlib`` trained on pydoc val."""
    docs = data.stdlib_documents()
    assert not [k for k in docs if k.startswith("pydoc_data/")]
    assert "os.py" in docs
    pydoc_val = _long_paragraphs(data.corpus("pydoc", "val"))
    stdlib_train = data.corpus("stdlib", "train")
    assert not [p[:60] for p in pydoc_val if p in stdlib_train]


@pytest.mark.parametrize("source", EMBEDDED)
def test_val_is_only_removed_from_not_rewritten(source):
    """Deduplication drops whole paragraphs of val and changes nothing else (train is untouched)."""
    docs = data.pydoc_documents() if source == "pydoc" else data.stdlib_documents()
    raw_val = "\n\n".join(docs[k] for k in sorted(docs) if data.split_of(k) == "val")
    raw_train = "\n\n".join(docs[k] for k in sorted(docs) if data.split_of(k) == "train")
    assert data.corpus(source, "train") == raw_train
    val = data.corpus(source, "val")
    kept = [data.paragraph_key(p) for p in data.paragraphs(val)]
    raw = [data.paragraph_key(p) for p in data.paragraphs(raw_val)]
    it = iter(raw)
    assert all(k in it for k in kept)  # an ordered subsequence of the raw val paragraphs
    assert 0.5 * len(raw_val) < len(val) < len(raw_val)


def test_dedupe_drops_quoted_paragraphs_keeps_the_rest():
    train = "intro\n\nThe if statement is used for conditional execution.\n\nmore train"
    val = "The if statement  is used\nfor conditional execution.\n  \nonly in val\n\nintro\n\nlast"
    assert data.dedupe(val, train) == "only in val\n\nlast"
    assert data.dedupe("a\n\nb", "c") == "a\n\nb"


def test_directory_source_is_deduplicated(tmp_path):
    """A local corpus where one document quotes another across the split (like pydoc's topics)."""
    quote = "A paragraph that both documents carry, long enough to matter here."
    names = [f"doc{i}.txt" for i in range(60)]
    val_names = [n for n in names if data.split_of(n) == "val"]
    train_names = [n for n in names if data.split_of(n) == "train"]
    assert val_names and train_names
    for n in names:
        (tmp_path / n).write_text(f"{quote}\n\nown text of {n}\n")
    train, val = data.corpus(f"file:{tmp_path}", "train"), data.corpus(f"file:{tmp_path}", "val")
    assert quote in train and quote not in val
    assert all(f"own text of {n}" in val for n in val_names)
    f = tmp_path / "one" / "a.txt"
    f.parent.mkdir()
    f.write_text(("same paragraph\n\n" * 20) + "tail only")
    assert "same paragraph" not in data.corpus(f"file:{f}", "val")
