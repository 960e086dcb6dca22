"""Conversion between ``ecospa.func.llama`` parameter trees and ``transformers`` checkpoints.

Covers LlamaForCausalLM, MistralForCausalLM (full attention) and Qwen2ForCausalLM (q/k/v biases).
HF stores ``nn.Linear`` weights as [out, in]; ecospa stores ``x @ W`` with explicit head axes:

    q_proj.weight [Hq*hd, D]  --T-->  [D, Hq*hd]  --reshape-->  wq [D, Hkv, G, 2, P]

HF query head ``h*G + g`` reads KV head ``h`` (``repeat_kv``), and HF's rotate-half layout puts
dim ``i`` of a head at ``(r, p) = (i // P, i % P)``, so the reshape is the whole conversion.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

import torch

LLAMA_TYPES = ("llama", "mistral", "qwen2")
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed here


def as_dict(config: Any) -> dict:
    """A plain dict from a transformers PretrainedConfig or a dict read from config.json."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"config must be a dict or a transformers config, got {type(config).__name__}")


MAX_SIZE = 2**31 - 1  # no dimension, head count or layer count of a real model is larger


def _need(c: dict, key: str):
    if c.get(key) is None:
        raise ValueError(f"config has no {key!r}; is this a LLaMA-family config.json?")
    return c[key]


def cfg_int(c: dict, key: str, default=None, lo: int = 1, hi: int = MAX_SIZE):
    """``c[key]`` as a whole number in [lo, hi] (``default`` when absent or null); ValueError
    naming the key for strings, floats, booleans or out-of-range values (config.json is input)."""
    v = c.get(key)
    if v is None:
        if default is None:
            raise ValueError(f"config has no {key!r}; is this the model's config.json?")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"config {key!r} must be a whole number, got {v!r} "
                         f"({type(v).__name__}); fix config.json")
    if not lo <= v <= hi:
        raise ValueError(f"config {key!r} = {v} is out of range [{lo}, {hi}]; fix config.json")
    return v


def cfg_float(c: dict, key: str, default: float) -> float:
    """``c[key]`` as a finite number > 0 (epsilons, rope_theta); ValueError naming the key."""
    v = c.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"config {key!r} must be a finite number > 0, got {v!r}; fix config.json")
    return float(v)


def cfg_bool(c: dict, key: str, default=None):
    """``c[key]`` as a JSON boolean (a string such as "false" is an error, not True)."""
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ValueError(f"config {key!r} must be true or false, got {v!r} ({type(v).__name__}); "
                         "fix config.json")
    return v


def cfg_str(c: dict, key: str, default=None):
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ValueError(f"config {key!r} must be a string, got {v!r}; fix config.json")
    return v


def _rope_theta(c: dict) -> float:
    """rope_theta from transformers 4 (top level + rope_scaling) or 5 (rope_parameters)."""
    for key in ("rope_parameters", "rope_scaling"):
        spec = c.get(key)
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise ValueError(f"config {key!r} must be an object or null, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"rope type {kind!r} is not implemented (only plain RoPE); "
                             "ecospa cannot reproduce this model's positions")
    rp = c.get("rope_parameters") or {}
    if rp.get("rope_theta") is not None:
        return cfg_float(rp, "rope_theta", 10000.0)
    return cfg_float(c, "rope_theta", 10000.0)


def config_from_hf(config: Any, tied: Optional[bool] = None):
    """``llama.Config`` from an HF config; ``tied`` is the fallback for tie_word_embeddings."""
    from ecospa.func import llama  # here, not at the top: llama.py re-exports this module

    c = as_dict(config)
    kind = cfg_str(c, "model_type", "llama")
    if kind not in LLAMA_TYPES:
        raise ValueError(f"model_type {kind!r} is not a LLaMA-family model ({LLAMA_TYPES})")
    act = c.get("hidden_act", "silu")
    if not isinstance(act, str) or act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if cfg_bool(c, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported: ecospa's LLaMA MLP has no biases")
    if cfg_bool(c, "use_sliding_window", False) and kind == "qwen2":
        raise ValueError("Qwen2 sliding-window attention is not implemented; use full attention")
    if kind != "qwen2" and cfg_bool(c, "attention_bias", False):
        raise ValueError("attention_bias=True puts a bias on o_proj, which ecospa does not "
                         "represent (Qwen2-style q/k/v biases are supported)")
    for key in ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
                "intermediate_size"):
        _need(c, key)
    heads = cfg_int(c, "num_attention_heads")
    dim = cfg_int(c, "hidden_size")
    max_len = cfg_int(c, "max_position_embeddings", 2048, hi=2**40)
    if kind == "mistral" and c.get("sliding_window") is not None:
        # ecospa attends over the full causal prefix: identical only within the window.
        max_len = min(max_len, cfg_int(c, "sliding_window", hi=2**40))
    tie = cfg_bool(c, "tie_word_embeddings")
    return llama.Config(
        vocab_size=cfg_int(c, "vocab_size"), dim=dim, n_layers=cfg_int(c, "num_hidden_layers"),
        n_heads=heads, n_kv_heads=cfg_int(c, "num_key_value_heads", heads),
        ffn_dim=cfg_int(c, "intermediate_size"), head_dim=cfg_int(c, "head_dim", max(1, dim // heads)),
        rope_theta=_rope_theta(c), norm_eps=cfg_float(c, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(tied if tie is None else tie), attention_bias=kind == "qwen2",
        max_seq_len=max_len, name="llama")  # name = the family (checkpoints dispatch on it)


def check_layer_count(n_layers: int, n_tensors: int, per_layer: int, key: str) -> None:
    """A config cannot describe more layers than the checkpoint has tensors for (checked before
    anything is built per layer, so a crafted count cannot exhaust memory)."""
    if n_layers * per_layer > n_tensors:
        raise ValueError(f"config {key!r} = {n_layers}, but the checkpoint holds only {n_tensors} "
                         "tensors, fewer than one per layer; does config.json belong to these "
                         "weights?")


def _layer_shapes(cfg) -> dict:
    """HF tensor name (within a layer) -> expected shape."""
    D, Hq, Hkv, hd, F_ = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    shapes = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
              "self_attn.q_proj.weight": (Hq * hd, D), "self_attn.k_proj.weight": (Hkv * hd, D),
              "self_attn.v_proj.weight": (Hkv * hd, D), "self_attn.o_proj.weight": (D, Hq * hd),
              "mlp.gate_proj.weight": (F_, D), "mlp.up_proj.weight": (F_, D),
              "mlp.down_proj.weight": (D, F_)}
    if cfg.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (Hq * hd,), "self_attn.k_proj.bias": (Hkv * hd,),
                       "self_attn.v_proj.bias": (Hkv * hd,)})
    return shapes


def expected_shapes(cfg) -> dict:
    """Every HF tensor name (with the "model." prefix) of a checkpoint for ``cfg`` -> shape."""
    out = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim), "model.norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in _layer_shapes(cfg).items()})
    return out


def _normalize_names(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Give every key the "model." prefix (except lm_head), drop recomputed buffers."""
    out = {}
    for k, v in state_dict.items():
        if k.endswith(_IGNORED):
            continue
        if not (k.startswith("model.") or k.startswith("lm_head.")):
            k = "model." + k
        out[k] = v
    return out


def check_state_dict(sd: dict, expected: dict) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; "
                         "does config.json belong to these weights?")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ValueError(f"checkpoint has tensors the config does not describe, e.g. {extra[:3]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(sd[k].shape)}, the config implies "
                             f"{tuple(shape)}; does config.json belong to these weights?")


def from_hf(state_dict: Mapping[str, torch.Tensor], config: Any,
            dtype: Optional[torch.dtype] = None):
    """(llama.Config, params) from an HF LLaMA/Mistral/Qwen2 state dict and config.

    Args:
      state_dict: tensors named like "model.layers.0.self_attn.q_proj.weight" (the "model."
        prefix is optional; lm_head.weight may be absent when embeddings are tied).
      config: a transformers config or the dict from config.json.
      dtype: cast weights to this dtype (default: keep). inv_freq is always float32.
    Returns a new tree; the input tensors are not modified (nor aliased).
    Example: ``cfg, params = llama.from_hf(model.state_dict(), model.config)``
    """
    from ecospa.func import llama

    sd = _normalize_names(state_dict)
    cfg = config_from_hf(config, tied="lm_head.weight" not in sd)
    check_layer_count(cfg.n_layers, len(sd), 1, "num_hidden_layers")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a tied model's state_dict() lists the shared tensor twice
    check_state_dict(sd, expected_shapes(cfg))
    D, Hkv, hd = cfg.dim, cfg.n_kv_heads, cfg.head_dim
    G, P = cfg.n_heads // Hkv, hd // 2

    def t(name):
        x = sd[name].detach()
        return x if dtype is None else x.to(dtype)

    def layer(i):
        n = f"model.layers.{i}."
        p = {"attn_norm": t(n + "input_layernorm.weight"),
             "wq": t(n + "self_attn.q_proj.weight").T.reshape(D, Hkv, G, 2, P),
             "wk": t(n + "self_attn.k_proj.weight").T.reshape(D, Hkv, 2, P),
             "wv": t(n + "self_attn.v_proj.weight").T.reshape(D, Hkv, hd),
             "wo": t(n + "self_attn.o_proj.weight").T.reshape(Hkv, G, hd, D),
             "inv_freq": llama.inv_freq(cfg).expand(Hkv, P).clone(),
             "mlp_norm": t(n + "post_attention_layernorm.weight"),
             "w_gate": t(n + "mlp.gate_proj.weight").T.contiguous(),
             "w_up": t(n + "mlp.up_proj.weight").T.contiguous(),
             "w_down": t(n + "mlp.down_proj.weight").T.contiguous()}
        if cfg.attention_bias:
            p.update(bq=t(n + "self_attn.q_proj.bias").reshape(Hkv, G, 2, P),
                     bk=t(n + "self_attn.k_proj.bias").reshape(Hkv, 2, P),
                     bv=t(n + "self_attn.v_proj.bias").reshape(Hkv, hd))
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in p.items()}

    params = {"embed": t("model.embed_tokens.weight").clone(),
              "layers": tuple(layer(i) for i in range(cfg.n_layers)),
              "norm": t("model.norm.weight").clone()}
    if not cfg.tie_embeddings:
        params["lm_head"] = t("lm_head.weight").clone()
    return cfg, params


def _check_representable(params: dict, cfg) -> int:
    """The common MLP width; ValueError naming the layer if HF cannot hold the tree."""
    from ecospa.func import llama

    full = llama.inv_freq(cfg)
    D, Hkv, G, hd = cfg.dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    widths = []
    for i, p in enumerate(params["layers"]):
        qk, dv = 2 * p["wq"].shape[-1], p["wv"].shape[-1]
        if p["wq"].shape[:3] != (D, Hkv, G) or qk != hd or dv != hd:
            raise ValueError(
                f"layer {i}: attention was pruned (qk dims {qk}, value dims {dv}, head_dim "
                f"{hd}); transformers' LLaMA needs qk = value = head_dim in every layer, scales "
                f"scores by 1/sqrt(head_dim) (ecospa keeps the original scale) and derives the "
                f"rotary frequencies from rope_theta, so only MLP-pruned trees can be exported")
        freq = p["inv_freq"].to(torch.float32)
        if not torch.allclose(freq, full.expand_as(freq), rtol=1e-6, atol=0.0):
            raise ValueError(f"layer {i}: inv_freq differs from rope_theta={cfg.rope_theta}'s "
                             "frequencies (reordered rotary pairs?); transformers cannot hold it")
        widths.append(p["w_gate"].shape[1])
    return uniform_width(widths, "intermediate_size")


def uniform_width(widths: list, config_key: str) -> int:
    """The one MLP width every layer shares; ValueError if transformers' single ``config_key`` can't hold them."""
    if len(set(widths)) > 1:
        raise ValueError(f"MLP widths differ across layers ({widths}); transformers' config has "
                         f"one {config_key}. Prune the MLP with a uniform sparsity to export")
    return widths[0]


def to_hf(params: dict, cfg) -> tuple:
    """(state_dict, config_dict) in transformers' LLaMA (or Qwen2, with biases) format.

    Raises ValueError when the tree has pruned attention or per-layer MLP widths, which an HF
    config cannot describe. Returns new tensors; ``params`` is unchanged.
    Example: ``sd, conf = llama.to_hf(params, cfg)``
    """
    ffn = _check_representable(params, cfg)
    D = cfg.dim
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = params["lm_head"]
    for i, p in enumerate(params["layers"]):
        n = f"model.layers.{i}."
        sd.update({n + "input_layernorm.weight": p["attn_norm"],
                   n + "self_attn.q_proj.weight": p["wq"].reshape(D, -1).T,  # [Hq*hd, D]
                   n + "self_attn.k_proj.weight": p["wk"].reshape(D, -1).T,  # [Hkv*hd, D]
                   n + "self_attn.v_proj.weight": p["wv"].reshape(D, -1).T,
                   n + "self_attn.o_proj.weight": p["wo"].reshape(-1, D).T,  # [D, Hq*hd]
                   n + "post_attention_layernorm.weight": p["mlp_norm"],
                   n + "mlp.gate_proj.weight": p["w_gate"].T, n + "mlp.up_proj.weight": p["w_up"].T,
                   n + "mlp.down_proj.weight": p["w_down"].T})
        if cfg.attention_bias:
            sd.update({n + "self_attn.q_proj.bias": p["bq"].reshape(-1),
                       n + "self_attn.k_proj.bias": p["bk"].reshape(-1),
                       n + "self_attn.v_proj.bias": p["bv"].reshape(-1)})
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    kind = "qwen2" if cfg.attention_bias else "llama"
    conf = {"architectures": ["Qwen2ForCausalLM" if cfg.attention_bias else "LlamaForCausalLM"],
            "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": D,
            "intermediate_size": ffn, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": _dtype_name(params["embed"])}
    if not cfg.attention_bias:
        conf.update(attention_bias=False, mlp_bias=False)
    return sd, conf


def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


# Every export's config.json carries this key (transformers keeps unknown keys as attributes):
# the files ecospa wrote with their sizes and sha256. Only a directory whose config.json has it
# and whose other files match it exactly is ever replaced by a later export.
EXPORT_MARKER = "ecospa_export"
_EXPORT_KIND = "ecospa-hf-export"


def _usage(text: str) -> Exception:
    from ecospa.errors import UsageError
    return UsageError(text)


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_export_target(directory, flag: str = "the export directory") -> str:
    """The absolute path ``write_hf`` may write; UsageError (nothing touched) unless ``directory``
    is absent, an empty directory, or a previous export of ours (it holds ``EXPORT_MARKER`` and
    only the files that marker lists). Refused: files, paths under a file, symbolic links,
    non-empty foreign directories (``.``, a parent of the model, a home directory...) and any
    directory that holds the working directory."""
    raw = os.fspath(directory)
    if not raw:
        raise _usage(f"{flag} is empty; give a directory path")
    path = os.path.abspath(raw)
    for part in path.split(os.sep):
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise _usage(f"{flag} {raw!r}: the name {part[:20]}... is longer than 255 bytes; "
                         "choose a shorter path")
    if os.path.islink(raw) or os.path.islink(path):
        raise _usage(f"{flag} {raw!r} is a symbolic link; give the real directory path (an export "
                     "never follows or replaces a link)")
    parent = os.path.dirname(path)
    probe = parent
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise _usage(f"{flag} {raw!r} is under {probe!r}, which is a file, not a directory")
    if not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise _usage(f"{flag} {raw!r} is a file; give a directory path (it will hold config.json "
                     "and model.safetensors)")
    entries = sorted(os.listdir(path))
    ours = _marker_files(path) if entries else set()
    if ours is None:
        raise _usage(f"{flag} {raw!r} is not an ecospa export (it holds {entries[:3]}"
                     f"{'...' if len(entries) > 3 else ''}, and no config.json with an intact "
                     f"{EXPORT_MARKER!r} record); an export replaces its directory, so choose a "
                     "new or empty one")
    if _is_under(os.path.realpath(os.getcwd()), os.path.realpath(path)):
        raise _usage(f"{flag} {raw!r} holds the working directory; an export replaces its whole "
                     "directory, so choose a new or dedicated one")
    if not entries:
        return path
    foreign = [e for e in entries if e not in ours or not os.path.isfile(os.path.join(path, e))
               or os.path.islink(os.path.join(path, e))]
    if foreign:
        raise _usage(f"{flag} {raw!r} is an earlier ecospa export, but also holds {foreign[:3]}, "
                     "which ecospa did not write; move them out or choose another directory")
    return path


def _marker_files(path: str):
    """The file names an ecospa export at ``path`` consists of, or None if it is not one: its
    config.json carries ``EXPORT_MARKER`` and every file listed there is intact (same size and
    sha256: weights that were edited or re-saved by another tool are not ours to delete)."""
    config = os.path.join(path, "config.json")
    if os.path.islink(config) or not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    info = info.get(EXPORT_MARKER) if isinstance(info, dict) else None
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("kind") != _EXPORT_KIND or not isinstance(files, dict):
        return None
    for name, want in files.items():
        file = os.path.join(path, name)
        if not isinstance(name, str) or not name or os.sep in name or name.startswith(".") or \
                not isinstance(want, dict) or os.path.islink(file) or not os.path.isfile(file) or \
                os.path.getsize(file) != want.get("bytes") or _sha256(file) != want.get("sha256"):
            return None
    return set(files) | {"config.json"}


def _sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_hf(sd: dict, conf: dict, directory: str, extra_files: Optional[Mapping[str, bytes]] = None) -> str:
    """Write config.json (with the ecospa marker) + model.safetensors into ``directory`` atomically.

    The files go to a temporary sibling which is renamed into place, so ``directory`` is never
    half-written. ``directory`` may be absent, empty or an earlier ecospa export; anything else
    is refused with a UsageError before a byte is written (see ``check_export_target``).
    ``extra_files`` (name -> bytes: tokenizer.json, a modeling file) are written with the
    weights and listed in the marker like them.
    """
    from safetensors.torch import save_file

    directory = check_export_target(directory)
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise _usage(f"cannot create {parent!r}: {err.strerror}") from err
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    old = None
    try:
        weights = os.path.join(tmp, "model.safetensors")
        save_file(sd, weights, metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            if not name or os.sep in name or name.startswith(".") or name in ("config.json", "model.safetensors"):
                raise ValueError(f"extra file name {name!r} is not allowed in an export")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                        "sha256": _sha256(os.path.join(tmp, name))}
                 for name in ["model.safetensors", *(extra_files or {})]}
        marker = {"kind": _EXPORT_KIND, "files": files,
            "note": "written by ecospa; a later export replaces this directory only while it "
                    "holds just these files, unchanged"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**conf, EXPORT_MARKER: marker}, f, indent=2, sort_keys=True)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o777 & ~_umask())
        check_export_target(directory)  # again, right before the swap
        if os.path.isdir(directory) and os.listdir(directory):
            old = directory + ".old-" + os.path.basename(tmp)
            os.replace(directory, old)  # swap in the new dir, then drop the old export
        os.replace(tmp, directory)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(directory):
            os.replace(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_hf(params: dict, cfg, directory: str, extra_files: Optional[Mapping[str, bytes]] = None) -> str:
    """Save as a transformers checkpoint (config.json + model.safetensors) atomically.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads the result.
    Raises ValueError if the tree is not representable (see ``to_hf``). Returns the directory.
    """
    sd, conf = to_hf(params, cfg)
    return write_hf(sd, conf, directory, extra_files)
