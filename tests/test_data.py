"""Embedded corpora, the train/val split, tokenizers and deterministic batches."""
from __future__ import annotations

import pytest
import torch

from ecospa.io import data


def test_pydoc_split_is_deterministic_and_disjoint():
    docs = data.pydoc_documents()
    train = {k for k in docs if data.split_of(k) == "train"}
    val = {k for k in docs if data.split_of(k) == "val"}
    assert train and val and not train & val and train | val == set(docs)
    text_val, text_train = data.corpus("pydoc", "val"), data.corpus("pydoc", "train")
    assert text_val == data.corpus("pydoc", "val")
    assert 10_000 < len(text_val) < len(text_train)
    for k in val:  # every held-out paragraph is in val, unless train quotes it (then it is dropped)
        for para in data.paragraphs(docs[k]):
            in_train = data.paragraph_key(para) in {data.paragraph_key(q) for t in train
                                                    for q in data.paragraphs(docs[t])}
            assert (para.strip() in text_val) != in_train


def test_stdlib_split_disjoint_by_file():
    docs = data.stdlib_documents(max_files=200)
    keys = {s: {k for k in docs if data.split_of(k) == s} for s in data.SPLITS}
    assert keys["train"] and keys["val"] and not keys["train"] & keys["val"]


def test_local_file_split(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x" * 90 + "y" * 10)
    assert data.corpus(f"file:{f}", "train") == "x" * 90
    assert data.corpus(f"file:{f}", "val") == "y" * 10
    with pytest.raises(FileNotFoundError):
        data.corpus(f"file:{tmp_path / 'missing.txt'}")


def test_bad_source_and_split():
    with pytest.raises(ValueError, match="unknown data source"):
        data.corpus("nope")
    with pytest.raises(ValueError, match="split"):
        data.corpus("pydoc", "test")


def test_byte_tokenizer_round_trip():
    tok = data.ByteTokenizer()
    text = "déjà vu ∑ x\n"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.max() < 256 and len(ids) == len(text.encode())
    assert tok.decode(ids) == text


def test_train_bpe_round_trip():
    pytest.importorskip("tokenizers")
    text = data.corpus("pydoc", "val")[:20000]
    tok = data.train_bpe([text], vocab_size=300)
    ids = tok.encode(text[:500])
    assert tok.vocab_size <= 300 and len(ids) < 500
    assert tok.decode(ids) == text[:500]


def test_batches_deterministic_and_resumable():
    ids = torch.arange(1000)
    a = data.token_batches(ids, 3, 8, seed=1)
    first = [next(a) for _ in range(5)]
    assert first[0].shape == (3, 9) and first[0].dtype == torch.int64
    resumed = data.token_batches(ids, 3, 8, seed=1, start=3)
    assert torch.equal(next(resumed), first[3]) and torch.equal(next(resumed), first[4])
    assert not torch.equal(next(data.token_batches(ids, 3, 8, seed=2)), first[0])
    assert (first[0][:, 1:] - first[0][:, :-1] == 1).all()  # contiguous windows


def test_eval_batches_fixed_and_non_overlapping():
    ids = torch.arange(100)
    batches = data.eval_batches(ids, 4, 10)
    x = torch.cat(batches)
    assert x.shape == (9, 11)
    assert torch.equal(x[:, 0], torch.arange(0, 90, 10))  # targets cover each token once
    assert batches[0].shape[0] == 4 and len(data.eval_batches(ids, 4, 10, max_batches=1)) == 1
    with pytest.raises(ValueError, match="seq_len"):
        data.eval_batches(torch.arange(5), 1, 10)
