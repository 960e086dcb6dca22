"""Read LLaMA-architecture GGUF files (llama.cpp's format) into ecospa parameter trees.

``load_gguf(path)`` dequantizes every tensor (Q4_1, Q8_0, F16, ... via the ``gguf`` package),
renames it to the Hugging Face convention, UNDOES the Q/K row permutation llama.cpp's converter
applies for its interleaved rotary layout, and builds the tree with ``ecospa.io.hf_llama.from_hf``.
``gguf_tokenizer(path)`` builds a ``tokenizers`` byte-level BPE from the file's metadata.

Needs the optional ``gguf`` package (``pip install gguf``).
"""
from __future__ import annotations

import mmap
import os
import struct

import numpy as np
import torch

from ecospa.io._hf_common import cfg_float, cfg_int
from ecospa.io.hf_llama import from_hf

_CONFIG_KEYS = {  # GGUF metadata key (after "llama.") -> HF config.json key
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")

LAYER_NAMES = {  # GGUF name inside "blk.N." -> HF name inside "model.layers.N."
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ValueError("reading GGUF files needs the 'gguf' package: pip install gguf") from err
    return gguf


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_STRING, _ARRAY = 8, 9
MAX_ARRAY_ITEMS = 4_000_000  # all metadata arrays together (a 256K vocabulary needs ~1M)
MAX_DIMS = 4                 # GGML_MAX_DIMS


def check_header(path) -> dict:
    """Walk a GGUF file's header, metadata and tensor infos with every count and length bounded
    by the bytes the file holds, BEFORE ``gguf.GGUFReader`` builds anything from them (it
    allocates per declared array element, so a 100-byte file declaring 2**40 elements would
    exhaust memory). Returns {"version", "tensors", "kvs", "data_offset"}; ValueError naming the
    field otherwise. Reads the file through mmap: no allocation beyond a few small objects."""

    path = os.fspath(path)
    size = os.path.getsize(path)
    if size < 24:
        raise ValueError(f"{path!r} is not a GGUF file: {size} bytes is shorter than the header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path!r} is not a GGUF file (no GGUF magic)")
        order = "<"
        version = struct.unpack_from("<I", m, 4)[0]
        if version & 0xFFFF == 0:
            order, version = ">", struct.unpack_from(">I", m, 4)[0]
        if version not in (2, 3):
            raise ValueError(f"{path!r}: GGUF version {version} is not supported (2 or 3 are)")
        pos = 8
        items = 0

        def need(n: int, what: str) -> None:
            if n < 0 or pos + n > size:
                raise ValueError(f"{path!r}: GGUF {what} needs {n} bytes at offset {pos}, but the "
                                 f"file has {size} bytes (truncated or corrupt file)")

        def u(fmt: str, what: str):
            nonlocal pos
            n = struct.calcsize(fmt)
            need(n, what)
            v = struct.unpack_from(order + fmt, m, pos)[0]
            pos += n
            return v

        def string(what: str) -> bytes:
            nonlocal pos
            n = u("Q", what + " length")
            need(n, what)
            out = m[pos:pos + n] if n <= 4096 else b""
            pos += n
            return out

        def value(kind: int, what: str, depth: int = 0) -> None:
            nonlocal pos, items
            if kind in _SCALARS:
                need(_SCALARS[kind], what)
                pos += _SCALARS[kind]
            elif kind == _STRING:
                string(what)
            elif kind == _ARRAY:
                if depth > 1:
                    raise ValueError(f"{path!r}: GGUF field {what!r} nests arrays too deeply")
                inner = u("I", what + " element type")
                count = u("Q", what + " length")
                unit = _SCALARS.get(inner, 8 if inner == _STRING else 12 if inner == _ARRAY else 0)
                if unit == 0:
                    raise ValueError(f"{path!r}: GGUF field {what!r} has unknown element type {inner}")
                if count * unit > size - pos:
                    raise ValueError(f"{path!r}: GGUF field {what!r} declares {count} elements, "
                                     f"more than the {size - pos} remaining bytes can hold "
                                     "(truncated or corrupt file)")
                items += count
                if items > MAX_ARRAY_ITEMS:
                    raise ValueError(f"{path!r}: GGUF field {what!r}: metadata arrays hold more "
                                     f"than {MAX_ARRAY_ITEMS} elements; not a model ecospa reads")
                if inner in _SCALARS:
                    pos += count * unit
                else:
                    for _ in range(count):
                        value(inner, what, depth + 1)
            else:
                raise ValueError(f"{path!r}: GGUF field {what!r} has unknown value type {kind}")

        n_tensors = u("Q", "tensor count")
        n_kv = u("Q", "metadata count")
        if n_kv * 13 > size - pos or n_tensors * 24 > size - pos:
            raise ValueError(f"{path!r}: GGUF header declares {n_kv} metadata fields and "
                             f"{n_tensors} tensors, more than {size} bytes can hold (corrupt file)")
        alignment = 32
        for i in range(n_kv):
            key = string(f"metadata key {i}").decode("utf-8", errors="replace")
            kind = u("I", f"type of {key!r}")
            start = pos
            value(kind, key)
            if key == "general.alignment":
                if kind != 4:
                    raise ValueError(f"{path!r}: GGUF general.alignment must be a uint32")
                alignment = struct.unpack_from(order + "I", m, start)[0]
                if alignment == 0 or alignment & (alignment - 1):
                    raise ValueError(f"{path!r}: GGUF general.alignment {alignment} is not a power of two")
        infos = []
        for i in range(n_tensors):
            name = string(f"tensor {i} name").decode("utf-8", errors="replace")
            n_dims = u("I", f"tensor {name!r} rank")
            if n_dims > MAX_DIMS:
                raise ValueError(f"{path!r}: GGUF tensor {name!r} has {n_dims} dims (at most {MAX_DIMS})")
            dims = [u("Q", f"tensor {name!r} shape") for _ in range(n_dims)]
            kind = u("I", f"tensor {name!r} type")
            offset = u("Q", f"tensor {name!r} offset")
            infos.append((name, dims, kind, offset))
        data_offset = pos + (-pos % alignment)
        sizes = _quant_sizes()
        for name, dims, kind, offset in infos:
            n = 1
            for d in dims:
                n *= d
            if kind not in sizes:
                raise ValueError(f"{path!r}: GGUF tensor {name!r} has unknown type {kind}")
            block, nbytes = sizes[kind]
            if n % block:
                raise ValueError(f"{path!r}: GGUF tensor {name!r}: {n} values are not whole "
                                 f"blocks of {block}")
            end = data_offset + offset + n // block * nbytes
            if end > size:
                raise ValueError(f"{path!r}: GGUF tensor {name!r} (shape {dims}) needs bytes up to "
                                 f"{end}, but the file has {size} (truncated or corrupt file)")
    return {"version": version, "tensors": len(infos), "kvs": n_kv, "data_offset": data_offset}


def _quant_sizes() -> dict:
    gguf = _gguf()
    return {int(k): (int(v[0]), int(v[1])) for k, v in gguf.GGML_QUANT_SIZES.items()}


def _reader(path):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    gguf = _gguf()
    check_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # numpy/struct errors on truncated or foreign files
        raise ValueError(f"{path!r} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err


def _value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception as err:  # undecodable strings, odd types
        raise ValueError(f"GGUF metadata {key!r} cannot be read ({type(err).__name__}: {err})") from err


def hf_config(reader) -> dict:
    """An HF-style config dict (config.json keys) from a GGUF reader's llama.* metadata."""
    arch = _value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' files are supported "
                         "(LLaMA, SmolLM, TinyLlama, Mistral-style dense decoders)")
    cfg = {"model_type": "llama"}
    for key, name in _CONFIG_KEYS.items():
        v = _value(reader, f"llama.{key}")
        if v is not None:
            cfg[name] = v
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}: the file is not a complete llama model")
    for key, name in _CONFIG_KEYS.items():  # the types and ranges a model can have
        if name in ("rope_theta", "rms_norm_eps"):
            cfg_float(cfg, name, 1.0)
        elif name in cfg:
            cfg_int(cfg, name, hi=2**40 if name == "max_position_embeddings" else 2**31 - 1)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rms_norm_eps", 1e-5)
    rope_dims = _value(reader, "llama.rope.dimension_count")
    cfg["head_dim"] = rope_dims if rope_dims is not None else \
        max(1, cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg_int(cfg, "head_dim")
    if "vocab_size" not in cfg:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        cfg["vocab_size"] = len(tokens.data) if tokens is not None else None
    names = {t.name for t in reader.tensors}
    blocks = {n.split(".")[1] for n in names if n.startswith("blk.") and n.count(".") >= 2}
    if cfg["num_hidden_layers"] > len(blocks):
        raise ValueError(f"GGUF metadata llama.block_count (num_hidden_layers) = "
                         f"{cfg['num_hidden_layers']}, but the file holds tensors for only "
                         f"{len(blocks)} blocks (truncated or corrupt file)")
    cfg["tie_word_embeddings"] = "output.weight" not in names
    return cfg


def _array(tensor, gguf) -> np.ndarray:
    """Dequantized tensor in numpy order (GGUF lists dims reversed: [in, out] -> [out, in])."""
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                gguf.GGMLQuantizationType.F64):
        data = np.asarray(tensor.data)
    else:
        data = gguf.quants.dequantize(tensor.data, kind)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"tensor {tensor.name!r}: {data.size} values for shape {shape}; "
                         "the file is truncated or corrupt")
    return data.reshape(shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half).

    The converter does, per head: ``w.reshape(n_head, 2, hd//2, dim).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # [H*hd, ...]


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (what its converter writes); ``unpermute`` inverts it."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(reader, cfg: dict, dtype: torch.dtype = torch.float32) -> dict:
    """HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...) from a GGUF reader."""
    gguf = _gguf()
    out = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
        elif stem in TOP_NAMES:
            name = f"{TOP_NAMES[stem]}.{suffix}"
        else:
            continue  # e.g. rope_freqs: recomputed from rope_theta
        try:
            w = torch.from_numpy(np.array(_array(t, gguf), dtype=np.float32)).to(dtype)
        except ValueError:
            raise
        except Exception as err:
            raise ValueError(f"tensor {t.name!r} could not be read ({err}); "
                             "the file is truncated or corrupt") from err
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if parts[2] == "attn_q" else cfg["num_key_value_heads"]
            if w.ndim != 2 or w.shape[0] % heads or (w.shape[0] // heads) % 2:
                raise ValueError(f"tensor {t.name!r} has shape {tuple(w.shape)}, which does not "
                                 f"split into {heads} heads of rotary pairs; the metadata does "
                                 "not belong to these tensors")
            w = unpermute(w, heads)
        out[name] = w
    _check_complete(out, cfg)
    return out


def _check_complete(sd: dict, cfg: dict) -> None:
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        need += [f"model.layers.{i}.{n}.weight" for n in LAYER_NAMES.values()]
    missing = [n for n in need if n not in sd]
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} required tensors, e.g. {missing[:3]}")


def tokenizer_info(reader) -> dict:
    """The tokenizer.ggml.* metadata as a plain dict (tokens, merges, token_type, ids, model)."""
    info = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            info[key[len("tokenizer.ggml."):]] = field.contents()
    return info


def load_gguf(path, dtype: torch.dtype = torch.float32):
    """Load a LLaMA-architecture GGUF file as an ecospa model.

    Args:
      path: the .gguf file.
      dtype: dtype of the returned parameters (quantized blocks are dequantized first).
    Returns:
      (cfg, params, tokenizer_info): ``llama.Config``, the parameter tree, and the
      ``tokenizer.ggml.*`` metadata (pass the path to ``gguf_tokenizer`` for a tokenizer).
    Example:
      cfg, params, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    reader = _reader(path)
    cfg = hf_config(reader)
    sd = hf_state_dict(reader, cfg, dtype)
    model_cfg, params = from_hf(sd, cfg)
    return model_cfg, params, tokenizer_info(reader)


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
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
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
    return build_tokenizer(tokenizer_info(_reader(path)))


__all__ = ["load_gguf", "gguf_tokenizer", "build_tokenizer", "hf_config", "hf_state_dict",
           "tokenizer_info", "permute", "unpermute"]
