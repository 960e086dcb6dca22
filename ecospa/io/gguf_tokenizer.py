"""The tokenizer of a GGUF file: a ``tokenizers`` byte-level BPE built from its metadata.

The text is split before BPE the way llama.cpp splits it for the file's pre-tokenizer
(``tokenizer.ggml.pre``): llama.cpp applies a list of regular expressions in turn, each one
splitting every piece the previous ones made into its matches and the text between them
(``src/llama-vocab.cpp``, ``llm_tokenizer_bpe``); that is a ``tokenizers`` ``Split(regex,
"isolated")`` per expression, then the byte-level mapping without its own regex. E.g. ``smollm``
first splits every ``\\p{N}`` character (``½``, ``①``, Arabic-Indic digits) on its own, which
GPT-2's split alone does not. A ``pre`` value not in ``PRE_TOKENIZERS`` is refused, as llama.cpp
refuses it.
"""
from __future__ import annotations

from ecospa.io.gguf import open_reader, tokenizer_info

# The regular expressions of llama.cpp's BPE pre-tokenizers (``llm_tokenizer_bpe``), in the
# order llama.cpp applies them. GPT2 is GPT-2's split (llama.cpp's version leaves out the final
# ``|\s+``: text no expression matches becomes a piece of its own anyway).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
           r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
          r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


class _Pre:
    def __init__(self, regexes: tuple, ignore_merges: bool = False):
        self.regexes, self.ignore_merges = regexes, ignore_merges


# tokenizer.ggml.pre -> (regexes, ignore_merges): a word that is a whole token is that token
# before any merge (llama.cpp's ``ignore_merges``, set for the llama-3 family).
PRE_TOKENIZERS = {
    **{name: _Pre(_DEFAULT) for name in ("", "default")},
    **{name: _Pre((_LLAMA3,), ignore_merges=True)
       for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral")},
    **{name: _Pre((_LLAMA3,)) for name in ("dbrx", "smaug-bpe")},
    **{name: _Pre((r"\p{N}", _GPT2))
       for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")},
    **{name: _Pre((_GPT2,)) for name in ("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4")},
    **{name: _Pre((_QWEN2,)) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}


def pre_tokenizer(pre):
    """The ``tokenizers`` pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre`` = ``pre``
    (None or "" is llama.cpp's "default"); ValueError naming the supported values otherwise."""
    from tokenizers import Regex, pre_tokenizers  # optional extra

    spec = _pre_spec(pre)
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


class UnsupportedTokenizer(ValueError):
    """A well-formed GGUF tokenizer that ecospa cannot reproduce (e.g. a pre-tokenizer it does not
    know). The weights are still usable; a malformed tokenizer is a plain ``ValueError``."""


def _pre_spec(pre) -> _Pre:
    pre = "" if pre is None else pre
    if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(n for n in PRE_TOKENIZERS if n))
        raise UnsupportedTokenizer(f"GGUF pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported; "
                         f"supported: {known}")
    return PRE_TOKENIZERS[pre]


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

    Built the way llama.cpp tokenizes a "gpt2" (byte-level BPE) vocabulary: the file's
    pre-tokenizer (``tokenizer.ggml.pre``, see ``pre_tokenizer``), BPE over its vocabulary and
    merges without a prefix space, and the tokens marked CONTROL (type 3) kept whole as special
    tokens.
    """
    if info.get("model") != "gpt2":
        raise ValueError(f"GGUF tokenizer model {info.get('model')!r} is not supported; "
                         "only byte-level BPE ('gpt2') is")
    from tokenizers import AddedToken, Tokenizer, decoders, models  # optional extra
    pre = _pre_spec(info.get("pre"))
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
        tk = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=pre.ignore_merges))
    except Exception as err:  # tokenizers raises its own exception types
        raise ValueError(f"GGUF tokenizer metadata is inconsistent: {err}") from err
    tk.pre_tokenizer = pre_tokenizer(info.get("pre"))
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty == 3 and set(t) <= chars]
    if special:
        tk.add_special_tokens(special)
    return tk


def gguf_tokenizer(path):
    """A ``tokenizers.Tokenizer`` built from the GGUF file's tokenizer metadata."""
    return build_tokenizer(tokenizer_info(open_reader(path)))


__all__ = ["PRE_TOKENIZERS", "build_tokenizer", "gguf_tokenizer", "pre_tokenizer"]
