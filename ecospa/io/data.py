"""Text sources, tokenizers, deterministic training batches and THE evaluation windows.

Sources (``corpus(source, split)``):
- "pydoc": ``pydoc_data.topics``, ~465 KB of English reference prose that ships with Python;
- "stdlib": the standard library's own ``.py`` files (~30 MB), no download;
- "file:PATH": a local text file (or a directory of ``.txt``/``.py``/``.md`` files);
- "wikitext103", "c4": through the ``datasets`` library when online (lazy import).
The embedded sources are split into train/val by a hash of each document's key (topic name or
file path), so the split is deterministic and independent of the Python build. Documents quote
each other (pydoc's ``compound`` topic holds the ``if``/``for``/``else`` topics verbatim), so the
val split then drops every paragraph that also occurs in the train split (``dedupe``): no
held-out paragraph is ever trained on. ``stdlib`` leaves out ``pydoc_data/`` (it IS the pydoc
text).

Evaluation (``ecospa train``'s validation perplexity, ``ecospa eval``, compress, the lm-eval
adapter) always scores ``windows``: non-overlapping windows of ``seq_len`` predictions from the
start of the stream (``seq_len + 1`` tokens each; the last token of one window is the first of the
next; no context crosses a window boundary).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import sysconfig
from pathlib import Path
from pydoc_data.topics import topics
from typing import Iterator, Optional, Sequence

import torch

from ecospa.errors import UsageError

SPLITS = ("train", "val")
VAL_PERCENT = 10  # documents whose key hashes to 0..9 (mod 100) are held out


def split_of(key: str) -> str:
    """"val" for about 10% of keys, else "train"; a pure function of the key."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return "val" if h % 100 < VAL_PERCENT else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def pydoc_documents() -> dict:
    """{topic key: text} from ``pydoc_data.topics``."""
    return dict(topics)


STDLIB_SKIP = ("site-packages", "__pycache__", "pydoc_data")  # pydoc_data: the "pydoc" source itself


def stdlib_documents(max_files: Optional[int] = None) -> dict:
    """{path relative to the stdlib: source text} for the standard library's ``.py`` files
    (without ``pydoc_data/``, whose text is the "pydoc" source)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP)
        for name in sorted(filenames):
            if name.endswith(".py"):
                path = Path(dirpath) / name
                docs[path.relative_to(root).as_posix()] = path.read_text("utf-8", errors="replace")
                if max_files is not None and len(docs) >= max_files:
                    return docs
    return docs


_PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n)")  # a blank line (kept as the separator)


def paragraph_key(paragraph: str) -> str:
    """A paragraph with its whitespace normalized: the unit ``dedupe`` compares."""
    return " ".join(paragraph.split())


def paragraphs(text: str) -> list:
    """The paragraphs of ``text`` (split at blank lines), empty ones left out."""
    return [p for p in _PARAGRAPH_BREAK.split(text)[::2] if p.strip()]


def dedupe(val: str, train: str) -> str:
    """``val`` without the paragraphs that also occur (whitespace-normalized) in ``train``;
    everything else, separators included, as it was."""
    seen = {paragraph_key(p) for p in paragraphs(train)}
    parts = _PARAGRAPH_BREAK.split(val)  # [paragraph, separator, paragraph, ...]
    kept = []
    for i in range(0, len(parts), 2):
        if not parts[i].strip() or paragraph_key(parts[i]) not in seen:
            kept.append(parts[i] + (parts[i + 1] if i + 1 < len(parts) else ""))
    return "".join(kept)


def _join(docs: dict, split: str) -> str:
    """One split of ``docs``: the documents whose key hashes to it; val deduplicated against train."""
    train = "\n\n".join(docs[k] for k in sorted(docs) if split_of(k) == "train")
    if split == "train":
        return train
    return dedupe("\n\n".join(docs[k] for k in sorted(docs) if split_of(k) == "val"), train)


@functools.lru_cache(maxsize=4)
def _embedded(source: str, split: str) -> str:
    """A split of an embedded source (read and deduplicated once per process)."""
    return _join(pydoc_documents() if source == "pydoc" else stdlib_documents(), split)


def _local(path: str, split: str) -> str:
    p = Path(path)
    if p.is_dir():
        docs = {f.relative_to(p).as_posix(): f.read_text("utf-8", errors="replace")
                for f in sorted(p.rglob("*")) if f.suffix in (".txt", ".py", ".md") and f.is_file()}
        if not docs:
            raise ValueError(f"{path}: no .txt/.py/.md files in this directory")
        return _join(docs, split)
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no such text file or directory")
    text = p.read_text("utf-8", errors="replace")
    cut = int(len(text) * (1 - VAL_PERCENT / 100))  # one file: the last 10% is validation
    return text[:cut] if split == "train" else dedupe(text[cut:], text[:cut])


def _hf(source: str, split: str, max_chars: int) -> str:
    try:
        import datasets  # noqa: F401  (optional extra, online)
    except ModuleNotFoundError as err:
        raise ValueError(f"data source {source!r} needs the `datasets` package and internet: "
                         "pip install datasets; or use --data pydoc|stdlib|file:PATH") from err
    hf_split = "validation" if split == "val" else "train"
    if source == "wikitext103":
        ds = datasets.load_dataset("wikitext", "wikitext-103-raw-v1", split=hf_split)
        return "".join(ds["text"])[:max_chars]
    ds = datasets.load_dataset("allenai/c4", "en", split=hf_split, streaming=True)
    parts, n = [], 0
    for row in ds:  # streaming: stop once enough text is read
        parts.append(row["text"])
        n += len(row["text"]) + 2
        if n >= max_chars:
            break
    return "\n\n".join(parts)


def corpus(source: str = "pydoc", split: str = "train", max_chars: int = 50_000_000) -> str:
    """Text of one split of a source ("pydoc", "stdlib", "file:PATH", "wikitext103", "c4").

    Example: ``val_text = corpus("pydoc", "val")``.
    """
    _check_split(split)
    if source in ("pydoc", "stdlib"):
        return _embedded(source, split)[:max_chars]
    if source.startswith("file:"):
        return _local(source[len("file:"):], split)[:max_chars]
    if source in ("wikitext103", "c4"):
        return _hf(source, split, max_chars)
    raise UsageError(f"unknown data source {source!r}; use pydoc, stdlib, file:PATH, wikitext103 or c4")


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no download, lossless."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        """int64 token ids [N]."""
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.zeros(0, dtype=torch.int64)
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)

    def decode(self, ids) -> str:
        return bytes(torch.as_tensor(ids, dtype=torch.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps a ``tokenizers.Tokenizer`` (trained here) or a ``transformers`` tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size() if hasattr(tok, "get_vocab_size") else len(tok)

    def encode(self, text: str) -> torch.Tensor:
        if hasattr(self.tok, "get_vocab_size"):  # tokenizers.Tokenizer
            ids = self.tok.encode(text).ids
        else:
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.int64)

    def decode(self, ids) -> str:
        return self.tok.decode(torch.as_tensor(ids).tolist())


def train_bpe(texts: Sequence[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE tokenizer trained on ``texts`` (needs the optional `tokenizers` package)."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ModuleNotFoundError as err:
        raise ValueError("train_bpe needs `tokenizers`: pip install 'ecospa[hf]'") from err
    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok)


def tokenizer(name: str = "byte"):
    """"byte", or a Hugging Face tokenizer name (e.g. "t5-base", "gpt2"; lazy, may download)."""
    if name == "byte":
        return ByteTokenizer()
    try:
        from transformers import AutoTokenizer
    except ModuleNotFoundError as err:
        raise ValueError(f"tokenizer {name!r} needs `transformers`: pip install 'ecospa[hf]'") from err
    return HFTokenizer(AutoTokenizer.from_pretrained(name))


def _check_ids(ids: torch.Tensor, seq_len: int, batch_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    if ids.ndim != 1 or ids.numel() < seq_len + 1:
        raise ValueError(f"need a 1-D token stream longer than seq_len + 1 = {seq_len + 1}, "
                         f"got shape {tuple(ids.shape)}; use more text or a shorter seq_len")


def batch_at(ids: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    """The training batch of ``step``: random windows [B, T+1], a pure function of (seed, step)."""
    _check_ids(ids, seq_len, batch_size)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    start = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=g)
    return ids[start[:, None] + torch.arange(seq_len + 1)]  # [B, T+1]


def token_batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0,
                  start: int = 0) -> Iterator[torch.Tensor]:
    """Infinite deterministic iterator of LongTensor [B, T+1] (inputs ``[:, :-1]``, targets
    ``[:, 1:]``). Batch i depends only on (seed, i), so resuming at step s is ``start=s``."""
    _check_ids(ids, seq_len, batch_size)
    step = start
    while True:
        yield batch_at(ids, step, batch_size, seq_len, seed)
        step += 1


def windows(ids: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """The evaluation windows [n, seq_len + 1]: non-overlapping, from the start of a 1-D stream."""
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are too few for one window of {seq_len} + 1; "
                         "use more text or a smaller --seq-len")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)  # [n, T+1]
    return ids[idx]


def eval_batches(ids: torch.Tensor, batch_size: int, seq_len: int,
                 max_batches: Optional[int] = None) -> list:
    """``windows`` in batches [B, T+1] (at most ``max_batches`` of them; no randomness)."""
    _check_ids(ids, seq_len, batch_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be >= 1, got {max_batches}")
    limit = None if max_batches is None else max_batches * batch_size
    return list(windows(ids, seq_len, limit).split(batch_size))


__all__ = ["corpus", "split_of", "dedupe", "paragraphs", "paragraph_key", "pydoc_documents", "stdlib_documents", "ByteTokenizer",
           "HFTokenizer", "train_bpe", "tokenizer", "batch_at", "token_batches", "windows", "eval_batches"]
