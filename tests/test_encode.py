"""One tokenizer adapter: ``ecospa.io.load.encode`` and ``ecospa.io.data.HFTokenizer`` agree."""
from __future__ import annotations

import pytest
import torch

from ecospa.io.data import ByteTokenizer, HFTokenizer
from ecospa.io.load import encode


class FakeTransformers:
    """A transformers-style tokenizer: called with the text; ``encode`` would add a BOS."""

    def __len__(self):
        return 300

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}

    def encode(self, text):
        return self(text)["input_ids"]


def test_encode_wraps_bare_tokenizers_in_the_one_adapter():
    raw = FakeTransformers()
    want = HFTokenizer(raw).encode("héllo")
    got = encode(raw, "héllo")
    assert got.dtype == torch.long and got.tolist() == want.tolist() == [ord(c) for c in "héllo"]
    assert encode(HFTokenizer(raw), "héllo").tolist() == want.tolist()
    assert encode(ByteTokenizer(), "hé").tolist() == list("hé".encode("utf-8"))


def test_encode_with_a_tokenizers_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    assert encode(tok, "a b c").tolist() == HFTokenizer(tok).encode("a b c").tolist() == [0, 1, 2]


def test_no_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="has no tokenizer"):
        encode(None, "x")
