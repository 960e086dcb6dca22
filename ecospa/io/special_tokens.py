"""A model's special tokens (bos, eos, unk, pad) and chat template, and the files that carry
them in a transformers directory.

Read from a GGUF's ``tokenizer.ggml.*`` metadata (``from_gguf``) or a Hugging Face directory's
tokenizer files (``from_hf_dir``); written as tokenizer_config.json, special_tokens_map.json and
generation_config.json (``hf_files``) plus the ids in config.json (``config_ids``). Without them
``AutoTokenizer`` on an export has no bos/eos/pad and lm-eval's ``hf`` model fails on its first
request. A pad token the source does not name falls back to eos (what lm-eval and most chat
models use).
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional

ROLES = ("bos", "eos", "unk", "pad")
_GGUF_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id",
              "pad": "padding_token_id"}


@dataclass(frozen=True)
class SpecialTokens:
    """Per role ("bos", "eos", "unk", "pad"): the token's text and its id (a role the source does
    not name is absent), and the chat template (a Jinja string) or None."""

    text: Mapping[str, str] = field(default_factory=dict)
    ids: Mapping[str, int] = field(default_factory=dict)
    chat_template: Optional[str] = None

    def __bool__(self) -> bool:
        return bool(self.text or self.ids or self.chat_template)


def _index(value) -> Optional[int]:
    """An integer id (the first of a list, as generation_config.json may give eos), or None."""
    if isinstance(value, list) and value:
        value = value[0]
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None


def _with_pad(text: dict, ids: dict, template) -> SpecialTokens:
    if "pad" not in text and "eos" in text:
        text["pad"] = text["eos"]
        if "eos" in ids:
            ids["pad"] = ids["eos"]
    template = template if isinstance(template, str) and template else None
    return SpecialTokens(text, ids, template)


def from_gguf(info: Mapping) -> SpecialTokens:
    """The special tokens of GGUF tokenizer metadata (``ecospa.io.gguf.tokenizer_info``)."""
    tokens = info.get("tokens") or []
    text, ids = {}, {}
    for role, key in _GGUF_KEYS.items():
        i = _index(info.get(key))
        if i is not None and 0 <= i < len(tokens) and isinstance(tokens[i], str):
            text[role], ids[role] = tokens[i], i
    return _with_pad(text, ids, info.get("chat_template"))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _content(token) -> Optional[str]:
    """A token as tokenizer_config.json writes it: a string or {"content": ...} (AddedToken)."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


def _vocab(path: str) -> dict:
    """token -> id of a tokenizer.json (model vocabulary and added tokens), {} without one."""
    tok = _read_json(os.path.join(path, "tokenizer.json"))
    model = tok.get("model") if isinstance(tok.get("model"), dict) else {}
    vocab = model.get("vocab")
    out = {}
    if isinstance(vocab, dict):
        out = {t: i for t, i in vocab.items() if _index(i) is not None}
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...]
        out = {v[0]: i for i, v in enumerate(vocab) if isinstance(v, list) and v and isinstance(v[0], str)}
    for added in tok.get("added_tokens") or []:
        if isinstance(added, dict) and _content(added) and _index(added.get("id")) is not None:
            out[added["content"]] = added["id"]
    return out


def _chat_template(path: str, conf: dict) -> Optional[str]:
    """chat_template.jinja, else tokenizer_config.json's "chat_template" (a string, or named
    templates: the "default" one), else chat_template.json."""
    try:
        with open(os.path.join(path, "chat_template.jinja"), encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        pass
    template = conf.get("chat_template", _read_json(os.path.join(path, "chat_template.json")).get("chat_template"))
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


def from_hf_dir(path: str) -> SpecialTokens:
    """The special tokens of a Hugging Face directory: the names in tokenizer_config.json (or
    special_tokens_map.json) with their ids from tokenizer.json; a role given only as an id
    (generation_config.json, config.json) takes its token from the vocabulary."""
    path = os.fspath(path)
    conf = _read_json(os.path.join(path, "tokenizer_config.json"))
    smap = _read_json(os.path.join(path, "special_tokens_map.json"))
    numbers_ = [_read_json(os.path.join(path, "generation_config.json")),
                _read_json(os.path.join(path, "config.json"))]
    vocab = _vocab(path)
    inverse = {i: t for t, i in vocab.items()}
    text, ids = {}, {}
    for role in ROLES:
        token = _content(conf.get(f"{role}_token")) or _content(smap.get(f"{role}_token"))
        if token is not None:
            text[role] = token
            if token in vocab:
                ids[role] = vocab[token]
            continue
        i = next((j for j in (_index(n.get(f"{role}_token_id")) for n in numbers_) if j is not None), None)
        if i is not None and i in inverse:
            text[role], ids[role] = inverse[i], i
    return _with_pad(text, ids, _chat_template(path, conf))


def config_ids(special: Optional[SpecialTokens]) -> dict:
    """{"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...} for config.json (the
    roles with an id): without them transformers assumes its own defaults (LLaMA 1/2, GPT-2 50256)."""
    ids = special.ids if special else {}
    return {f"{r}_token_id": ids[r] for r in ("bos", "eos", "pad") if r in ids}


def _dump(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def hf_files(special: Optional[SpecialTokens], tokenizer: bool) -> dict:
    """The files (name -> bytes) that tell transformers about the special tokens:
    generation_config.json when an id is known, and with a ``tokenizer`` (a tokenizer.json in
    the export) tokenizer_config.json and special_tokens_map.json, so ``AutoTokenizer`` reads
    exactly that tokenizer.json with its bos/eos/unk/pad and chat template."""
    special = special or SpecialTokens()
    files = {}
    if config_ids(special):
        files["generation_config.json"] = _dump(config_ids(special))
    if tokenizer:
        names = {f"{r}_token": special.text[r] for r in ROLES if r in special.text}
        conf = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False, **names}
        if special.chat_template:
            conf["chat_template"] = special.chat_template
        files["tokenizer_config.json"] = _dump(conf)
        files["special_tokens_map.json"] = _dump(names)
    return files


__all__ = ["ROLES", "SpecialTokens", "from_gguf", "from_hf_dir", "config_ids", "hf_files"]
