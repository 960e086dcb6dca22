"""The tokenizer of a GGUF file: a ``tokenizers`` byte-level BPE built from its metadata."""
from __future__ import annotations

from ecospa.io.gguf import open_reader, tokenizer_info


def _byte_alphabet() -> dict:
    """GPT-2's byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build_tokenizer(info: dict):
    """A ``tokenizers.Tokenizer`` (byte-level BPE) from ``tokenizer_info`` metadata.

    Built the way transformers builds a tokenizer from a GGUF ("gpt2" model): BPE over the
    file's vocabulary and merges, GPT-2 byte-level pre-tokenizer without a prefix space, and the
    tokens marked CONTROL (type 3) kept whole as special tokens.
    """
    if info.get("model") != "gpt2":
        raise ValueError(f"GGUF tokenizer model {info.get('model')!r} is not supported; "
                         "only byte-level BPE ('gpt2') is")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # optional extra
    tokens, raw_merges = info.get("tokens"), info.get("merges") or []
    types = info.get("token_type") or []
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("GGUF tokenizer.ggml.tokens must be a non-empty list of strings")
    if not isinstance(raw_merges, list) or not all(
            isinstance(m, str) and len(m.split(" ")) == 2 for m in raw_merges):
        raise ValueError("GGUF tokenizer.ggml.merges must be a list of 'left right' strings")
    if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                              for t in types):
        raise ValueError("GGUF tokenizer.ggml.token_type must be a list of integers")
    alphabet = _byte_alphabet()
    chars = set(alphabet.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        if not set(tok) <= chars:
            tok = "".join(alphabet[b] for b in tok.encode("utf-8", "surrogatepass"))
        vocab.setdefault(tok, i)
    merges = [tuple(m.split(" ")) for m in raw_merges]
    try:
        tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    except Exception as err:  # tokenizers raises its own exception types
        raise ValueError(f"GGUF tokenizer metadata is inconsistent: {err}") from err
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == 3 and set(t) <= chars]
    if special:
        tk.add_special_tokens(special)
    return tk


def gguf_tokenizer(path):
    """A ``tokenizers.Tokenizer`` built from the GGUF file's tokenizer metadata."""
    return build_tokenizer(tokenizer_info(open_reader(path)))


__all__ = ["build_tokenizer", "gguf_tokenizer"]
