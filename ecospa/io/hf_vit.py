"""Conversion between ``ecospa.func.vit`` trees and ``transformers``' ViT / DeiT image classifiers.

Reads ``ViTForImageClassification``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` state dicts under either naming: the one checkpoints
carry on disk (``vit.encoder.layer.N.attention.attention.query``, what ``save_pretrained`` writes
and the hub holds) or the one ``model.state_dict()`` has in transformers 5
(``vit.layers.N.attention.q_proj``). Writes the on-disk naming, which every transformers version
loads. Linear weights are [out, in]; ecospa stores ``x @ W`` with explicit head axes.

A pruned tree is exported after ``ecospa.func.padding.pad`` (the ``hf-padded`` export does it):
transformers' ViT has one head dim and one intermediate size, and a padded tree is dense-shaped
with the same logits. ``to_hf`` refuses a tree that is still pruned.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from ecospa.func import vit
from ecospa.io._hf_common import (as_dict, cfg_bool, cfg_float, cfg_int, cfg_str, check_layer_count,
                                  check_layers_found, check_state_dict)
from ecospa.io.hf_write import write_hf

VIT_TYPES = ("vit", "deit")
_NEW_NAMES = [  # transformers 5 in-memory names -> the on-disk (legacy) ones
    (re.compile(r"^(vit|deit)\.layers\.(\d+)\.attention\.(q|k|v)_proj\."),
     lambda m: f"{m[1]}.encoder.layer.{m[2]}.attention.attention."
               f"{ {'q': 'query', 'k': 'key', 'v': 'value'}[m[3]]}."),
    (re.compile(r"^(vit|deit)\.layers\.(\d+)\.attention\.o_proj\."),
     lambda m: f"{m[1]}.encoder.layer.{m[2]}.attention.output.dense."),
    (re.compile(r"^(vit|deit)\.layers\.(\d+)\.mlp\.fc1\."),
     lambda m: f"{m[1]}.encoder.layer.{m[2]}.intermediate.dense."),
    (re.compile(r"^(vit|deit)\.layers\.(\d+)\.mlp\.fc2\."),
     lambda m: f"{m[1]}.encoder.layer.{m[2]}.output.dense."),
    (re.compile(r"^(vit|deit)\.layers\.(\d+)\.(layernorm_before|layernorm_after)\."),
     lambda m: f"{m[1]}.encoder.layer.{m[2]}.{m[3]}."),
]


def _size(c: dict, key: str, default: int) -> int:
    """image_size / patch_size: a whole number or a square [n, n] pair."""
    v = c.get(key, default)
    if isinstance(v, (list, tuple)):
        if len(v) != 2 or v[0] != v[1]:
            raise ValueError(f"config {key!r} = {v!r}: only square images and patches are "
                             "supported (height == width)")
        v = v[0]
    return cfg_int({key: v}, key)


def config_from_hf(config: Any, teacher_head: bool = False):
    """``vit.Config`` from an HF ViT/DeiT config (object or config.json dict). ``teacher_head``
    (DeiT with teacher) is read from the weights by ``from_hf``."""
    c = as_dict(config)
    kind = cfg_str(c, "model_type")
    if kind not in VIT_TYPES:
        raise ValueError(f"model_type {kind!r} is not ViT or DeiT (expected one of {VIT_TYPES})")
    act = c.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"hidden_act {act!r} is not supported (ViT/DeiT use the exact erf "
                         "'gelu' only)")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if c.get(key) is None:
            raise ValueError(f"config has no {key!r}; is this a {kind} config.json?")
    dim, heads = cfg_int(c, "hidden_size"), cfg_int(c, "num_attention_heads")
    if dim % heads:
        raise ValueError(f"hidden_size {dim} is not a multiple of num_attention_heads {heads}")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim != dim // heads:
        raise ValueError(f"head_dim {head_dim!r} != hidden_size / num_attention_heads; not supported")
    labels = c.get("id2label")
    n_classes = len(labels) if isinstance(labels, Mapping) and labels else cfg_int(c, "num_labels", 2)
    return vit.Config(image_size=_size(c, "image_size", 224), patch_size=_size(c, "patch_size", 16),
                      n_channels=cfg_int(c, "num_channels", 3), dim=dim,
                      n_layers=cfg_int(c, "num_hidden_layers"), n_heads=heads,
                      ffn_dim=cfg_int(c, "intermediate_size", 4 * dim), n_classes=n_classes,
                      norm_eps=cfg_float(c, "layer_norm_eps", 1e-12),
                      distillation=kind == "deit", teacher_head=teacher_head, name="vit")


def _normalize_names(state_dict: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in state_dict.items():
        for pat, repl in _NEW_NAMES:
            if pat.match(k):
                k = pat.sub(repl, k)
                break
        out[k] = v
    return out


def expected_shapes(cfg, prefix: str, qkv_bias: bool = True) -> dict:
    """Every HF tensor name for ``cfg`` (on-disk naming, ``prefix`` "vit" or "deit") -> shape."""
    D, F_, C, p, K = cfg.dim, cfg.ffn_dim, cfg.n_channels, cfg.patch_size, cfg.n_classes
    e = f"{prefix}.embeddings."
    out = {e + "cls_token": (1, 1, D), e + "position_embeddings": (1, cfg.seq_len, D),
           e + "patch_embeddings.projection.weight": (D, C, p, p),
           e + "patch_embeddings.projection.bias": (D,),
           f"{prefix}.layernorm.weight": (D,), f"{prefix}.layernorm.bias": (D,)}
    if cfg.distillation:
        out[e + "distillation_token"] = (1, 1, D)
    heads = ("cls_classifier", "distillation_classifier") if cfg.teacher_head else ("classifier",)
    for h in heads:
        out.update({h + ".weight": (K, D), h + ".bias": (K,)})
    layer = {"layernorm_before.weight": (D,), "layernorm_before.bias": (D,),
             "attention.output.dense.weight": (D, D), "attention.output.dense.bias": (D,),
             "layernorm_after.weight": (D,), "layernorm_after.bias": (D,),
             "intermediate.dense.weight": (F_, D), "intermediate.dense.bias": (F_,),
             "output.dense.weight": (D, F_), "output.dense.bias": (D,)}
    for n in ("query", "key", "value"):
        layer[f"attention.attention.{n}.weight"] = (D, D)
        if qkv_bias:
            layer[f"attention.attention.{n}.bias"] = (D,)
    for i in range(cfg.n_layers):
        out.update({f"{prefix}.encoder.layer.{i}.{k}": s for k, s in layer.items()})
    return out


def from_hf(state_dict: Mapping[str, torch.Tensor], config: Any, dtype: Optional[torch.dtype] = None):
    """(vit.Config, params) from an HF ViT/DeiT image-classification state dict and config.

    ``qkv_bias: false`` loads zero q/k/v biases (the same function). A ``pooler`` (ViTModel's,
    unused by the classifier) is ignored. Returns a new tree; the inputs are neither modified
    nor aliased. Example: ``cfg, params = hf_vit.from_hf(model.state_dict(), model.config)``
    """
    c = as_dict(config)
    sd = {k: v for k, v in _normalize_names(state_dict).items() if ".pooler." not in f".{k}"}
    if "classifier.weight" not in sd and "cls_classifier.weight" not in sd:
        raise ValueError("the checkpoint has no image classifier ('classifier' or "
                         "'cls_classifier'): only ViTForImageClassification / "
                         "DeiTForImageClassification(WithTeacher) are supported")
    cfg = config_from_hf(c, teacher_head="cls_classifier.weight" in sd)
    prefix = "deit" if cfg.distillation else "vit"
    qkv_bias = cfg_bool(c, "qkv_bias", True)
    check_layer_count(cfg.n_layers, len(sd), 1, "num_hidden_layers")
    check_layers_found(sd, cfg.n_layers, "num_hidden_layers", prefix=f"{prefix}.encoder.layer.")
    check_state_dict(sd, expected_shapes(cfg, prefix, qkv_bias))
    D, H, E = cfg.dim, cfg.n_heads, cfg.head_dim

    def t(name):
        x = sd[name].detach()
        return (x if dtype is None else x.to(dtype)).clone(memory_format=torch.contiguous_format)

    def layer(i):
        n = f"{prefix}.encoder.layer.{i}."
        a = n + "attention.attention."
        p = {"ln1_w": t(n + "layernorm_before.weight"), "ln1_b": t(n + "layernorm_before.bias")}
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            w = t(a + theirs + ".weight")
            p["w" + ours] = w.T.reshape(D, H, E)
            p["b" + ours] = (t(a + theirs + ".bias") if qkv_bias else w.new_zeros(D)).reshape(H, E)
        p.update(wo=t(n + "attention.output.dense.weight").T.reshape(H, E, D),
                 bo=t(n + "attention.output.dense.bias"),
                 ln2_w=t(n + "layernorm_after.weight"), ln2_b=t(n + "layernorm_after.bias"),
                 w_in=t(n + "intermediate.dense.weight").T, b_in=t(n + "intermediate.dense.bias"),
                 w_out=t(n + "output.dense.weight").T, b_out=t(n + "output.dense.bias"))
        return {k: v.contiguous() for k, v in p.items()}

    e = f"{prefix}.embeddings."
    params = {"w_patch": t(e + "patch_embeddings.projection.weight").reshape(D, -1).T.contiguous(),
              "b_patch": t(e + "patch_embeddings.projection.bias"), "cls": t(e + "cls_token").reshape(D)}
    if cfg.distillation:
        params["dist"] = t(e + "distillation_token").reshape(D)
    head = "cls_classifier" if cfg.teacher_head else "classifier"
    params.update(pos=t(e + "position_embeddings").reshape(cfg.seq_len, D),
                  layers=tuple(layer(i) for i in range(cfg.n_layers)),
                  ln_f_w=t(f"{prefix}.layernorm.weight"), ln_f_b=t(f"{prefix}.layernorm.bias"),
                  head_w=t(head + ".weight").T.contiguous(), head_b=t(head + ".bias"))
    if cfg.teacher_head:
        params.update(dist_head_w=t("distillation_classifier.weight").T.contiguous(),
                      dist_head_b=t("distillation_classifier.bias"))
    return cfg, params


def _check_dense(params: dict, cfg) -> None:
    D, H, E = cfg.dim, cfg.n_heads, cfg.head_dim
    for i, p in enumerate(params["layers"]):
        shapes = (p["wq"].shape, p["wk"].shape, p["wv"].shape, p["w_in"].shape)
        if shapes != ((D, H, E),) * 3 + ((D, cfg.ffn_dim),):
            raise ValueError(f"layer {i} is pruned (qk dims {p['wq'].shape[-1]}, value dims "
                             f"{p['wv'].shape[-1]}, MLP width {p['w_in'].shape[1]}); transformers' "
                             "ViT has one head dim and one intermediate_size: export it padded "
                             "(ecospa.func.padding.pad, or `ecospa export --format hf-padded`)")


def to_hf(params: dict, cfg) -> tuple:
    """(state_dict, config_dict) of ``ViTForImageClassification`` (DeiT: ``DeiTForImage
    Classification``, with a teacher head ``...WithTeacher``), on-disk tensor names.

    ValueError for a pruned tree (pad it first). New tensors; ``params`` is unchanged.
    """
    _check_dense(params, cfg)
    D = cfg.dim
    prefix = "deit" if cfg.distillation else "vit"
    e = f"{prefix}.embeddings."
    sd = {e + "cls_token": params["cls"].reshape(1, 1, D),
          e + "position_embeddings": params["pos"].reshape(1, cfg.seq_len, D),
          e + "patch_embeddings.projection.weight":
              params["w_patch"].T.reshape(D, cfg.n_channels, cfg.patch_size, cfg.patch_size),
          e + "patch_embeddings.projection.bias": params["b_patch"],
          f"{prefix}.layernorm.weight": params["ln_f_w"], f"{prefix}.layernorm.bias": params["ln_f_b"]}
    if cfg.distillation:
        sd[e + "distillation_token"] = params["dist"].reshape(1, 1, D)
    if cfg.teacher_head:
        sd.update({"cls_classifier.weight": params["head_w"].T, "cls_classifier.bias": params["head_b"],
                   "distillation_classifier.weight": params["dist_head_w"].T,
                   "distillation_classifier.bias": params["dist_head_b"]})
    else:
        sd.update({"classifier.weight": params["head_w"].T, "classifier.bias": params["head_b"]})
    for i, p in enumerate(params["layers"]):
        n = f"{prefix}.encoder.layer.{i}."
        a = n + "attention.attention."
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            sd[a + theirs + ".weight"] = p["w" + ours].reshape(D, D).T
            sd[a + theirs + ".bias"] = p["b" + ours].reshape(D)
        sd.update({n + "layernorm_before.weight": p["ln1_w"], n + "layernorm_before.bias": p["ln1_b"],
                   n + "attention.output.dense.weight": p["wo"].reshape(D, D).T,
                   n + "attention.output.dense.bias": p["bo"],
                   n + "layernorm_after.weight": p["ln2_w"], n + "layernorm_after.bias": p["ln2_b"],
                   n + "intermediate.dense.weight": p["w_in"].T, n + "intermediate.dense.bias": p["b_in"],
                   n + "output.dense.weight": p["w_out"].T, n + "output.dense.bias": p["b_out"]})
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    arch = ("DeiTForImageClassificationWithTeacher" if cfg.teacher_head else
            "DeiTForImageClassification" if cfg.distillation else "ViTForImageClassification")
    labels = {str(i): f"LABEL_{i}" for i in range(cfg.n_classes)}
    conf = {"architectures": [arch], "model_type": prefix, "hidden_size": D,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "intermediate_size": cfg.ffn_dim, "hidden_act": "gelu", "layer_norm_eps": cfg.norm_eps,
            "image_size": cfg.image_size, "patch_size": cfg.patch_size,
            "num_channels": cfg.n_channels, "qkv_bias": True, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "id2label": labels,
            "label2id": {v: int(k) for k, v in labels.items()},
            "dtype": str(params["w_patch"].dtype).removeprefix("torch.")}
    return sd, conf


def save_hf(params: dict, cfg, directory: str, extra_files=None, config_extra=None) -> str:
    """Save as a stock transformers ViT/DeiT directory (config.json + model.safetensors),
    atomically (see ``write_hf``). Pad a pruned tree first."""
    sd, conf = to_hf(params, cfg)
    return write_hf(sd, conf, directory, extra_files, config_extra)


__all__ = ["VIT_TYPES", "config_from_hf", "expected_shapes", "from_hf", "to_hf", "save_hf"]
