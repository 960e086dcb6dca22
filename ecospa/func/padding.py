"""Padded layout: a pruned tree back in its family's dense shapes, computing the same function.

``pad(params, cfg)`` returns a tree with every layer at the ORIGINAL sizes, so tools that know
only one head_dim and one intermediate_size (stock ``transformers``, llama.cpp, PEFT, lm-eval)
run it unchanged:

- LLaMA Q/K: each kept rotary pair goes back to its original slot ``(j, j + head_dim/2)`` of its
  KV head (the slot is found from the pair's frequency in ``inv_freq``); removed pairs are zero
  in wq, wk (and bq, bk), so they add nothing to q.k; the scale is already the original one.
  GPT-2 Q/K (no RoPE): kept dims first, zeros after.
- V/O: kept value dims first, zeros after (wv, bv columns and wo rows), up to head_dim.
- MLP: zero columns of w_gate/w_up (w_in, b_in) and zero rows of w_down (w_out) up to the widest
  layer: silu(0) * 0 = 0 and gelu(0) = 0, so they add nothing.

``compact(params, cfg)`` goes the other way: it drops the units that are zero on a whole side
(exactly the ones ``pad`` adds, or what a masked dense model has), returning the sliced tree,
so a model can leave for another tool in the padded layout and come back compact.
"""
from __future__ import annotations

import dataclasses

import torch

from ecospa.func import gpt2, llama
from ecospa.func.families import family_of


def _llama_slots(inv: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """Original pair index [Hkv, P_kept] of each kept frequency (nearest in log space)."""
    d = (inv.double().log()[..., None] - full.double().log()).abs()  # [Hkv, P, P0]
    slots = d.argmin(-1)
    if bool((d.amin(-1) > 1e-4).any()):
        raise ValueError("a layer's inv_freq holds frequencies that are not in the model's RoPE "
                         "table (rope_theta/head_dim in the config do not match the weights)")
    for row in slots:
        if row.unique().numel() != row.numel():
            raise ValueError("two kept rotary pairs of one head map to the same frequency slot")
    return slots


def _scatter(x: torch.Tensor, axis: int, index: torch.Tensor, size: int, head_axis=None) -> torch.Tensor:
    """Zeros with ``size`` along ``axis``; x's entries put at ``index`` (per head when index is
    [H, k] and ``head_axis`` names the head axis of x)."""
    shape = list(x.shape)
    shape[axis] = size
    out = x.new_zeros(shape)
    if head_axis is None:
        return out.index_copy(axis, index, x)
    for h in range(x.shape[head_axis]):
        sl_in = x.select(head_axis, h)
        ax = axis - (axis > head_axis)
        out.select(head_axis, h).index_copy_(ax, index[h], sl_in)
    return out


def _pad_end(x: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    n = x.shape[axis]
    if n > size:
        raise ValueError(f"a width of {n} exceeds the dense size {size}")
    return _scatter(x, axis, torch.arange(n, device=x.device), size)


def _mlp_width(params: dict, key: str, axis: int, cfg) -> int:
    return max([cfg.ffn_dim] + [p[key].shape[axis] for p in params["layers"]])


def pad(params: dict, cfg) -> tuple:
    """(padded params, cfg for them): dense shapes, same logits. Pure; inputs untouched."""
    return {"llama": _pad_llama, "gpt2": _pad_gpt2}[family_of(cfg).name](params, cfg)


def _pad_llama(params: dict, cfg: llama.Config) -> tuple:
    P0, hd = cfg.head_dim // 2, cfg.head_dim
    full = llama.inv_freq(cfg)
    F_ = _mlp_width(params, "w_up", 1, cfg)
    layers = []
    for p in params["layers"]:
        slots = _llama_slots(p["inv_freq"], full.to(p["inv_freq"].device))  # [Hkv, P]
        q = dict(p)
        q["wq"] = _scatter(p["wq"], 4, slots, P0, head_axis=1)
        q["wk"] = _scatter(p["wk"], 3, slots, P0, head_axis=1)
        if "bq" in p:
            q["bq"] = _scatter(p["bq"], 3, slots, P0, head_axis=0)
            q["bk"] = _scatter(p["bk"], 2, slots, P0, head_axis=0)
            q["bv"] = _pad_end(p["bv"], 1, hd)
        q["inv_freq"] = full.to(p["inv_freq"]).expand(p["inv_freq"].shape[0], P0).clone()
        q["wv"], q["wo"] = _pad_end(p["wv"], 2, hd), _pad_end(p["wo"], 2, hd)
        q["w_gate"], q["w_up"] = _pad_end(p["w_gate"], 1, F_), _pad_end(p["w_up"], 1, F_)
        q["w_down"] = _pad_end(p["w_down"], 0, F_)
        layers.append(q)
    return {**params, "layers": tuple(layers)}, dataclasses.replace(cfg, ffn_dim=F_)


def _pad_gpt2(params: dict, cfg: gpt2.Config) -> tuple:
    hd = cfg.head_dim
    F_ = _mlp_width(params, "w_in", 1, cfg)
    layers = []
    for p in params["layers"]:
        q = dict(p)
        for k, axis in (("wq", 2), ("wk", 2), ("wv", 2), ("bq", 1), ("bk", 1), ("bv", 1), ("wo", 1)):
            q[k] = _pad_end(p[k], axis, hd)
        q["w_in"], q["b_in"] = _pad_end(p["w_in"], 1, F_), _pad_end(p["b_in"], 0, F_)
        q["w_out"] = _pad_end(p["w_out"], 0, F_)
        layers.append(q)
    return {**params, "layers": tuple(layers)}, dataclasses.replace(cfg, ffn_dim=F_)


def _nonzero(x: torch.Tensor, axis: int, keep_axes=()) -> torch.Tensor:
    """Bool over ``axis`` (and ``keep_axes``, in order): some entry along the other axes != 0."""
    dims = [d for d in range(x.ndim) if d != axis and d not in keep_axes]
    return (x != 0).any(dim=dims) if dims else x != 0


def _uniform_keep(alive: torch.Tensor) -> torch.Tensor:
    """Per head [H, n] alive flags -> [H, k] indices, k = the most alive in any head (a head
    with fewer keeps its lowest-index zero units so all heads share one width; still exact)."""
    k = max(1, int(alive.sum(-1).max()))
    order = torch.argsort((~alive).to(torch.int8), dim=-1, stable=True)[:, :k]
    return order.sort(dim=-1).values


def _gather(x: torch.Tensor, axis: int, index: torch.Tensor, head_axis=None) -> torch.Tensor:
    if head_axis is None:
        return x.index_select(axis, index)
    ax = axis - (axis > head_axis)
    return torch.stack([x.select(head_axis, h).index_select(ax, index[h])
                        for h in range(x.shape[head_axis])], dim=head_axis)


def compact(params: dict, cfg) -> dict:
    """The sliced tree of a padded (or masked) one: units that are all-zero on one coupled side
    (Q or K pair, V or O dim, MLP input or output neuron) are removed. Same logits."""
    family = family_of(cfg).name
    layers = []
    for p in params["layers"]:
        q = dict(p)
        if family == "llama":
            a = _nonzero(p["wq"], 4, (1,))  # [Hkv, P]
            b = _nonzero(p["wk"], 3, (1,))
            if "bq" in p:
                a, b = a | _nonzero(p["bq"], 3, (0,)), b | _nonzero(p["bk"], 2, (0,))
            qk = _uniform_keep(a & b)
            for k, axis, head in (("wq", 4, 1), ("wk", 3, 1), ("bq", 3, 0), ("bk", 2, 0), ("inv_freq", 1, 0)):
                if k in p:
                    q[k] = _gather(p[k], axis, qk, head)
            v_side = _nonzero(p["wv"], 2, (1,)) | (_nonzero(p["bv"], 1, (0,)) if "bv" in p else False)
            vo = _uniform_keep(v_side & _nonzero(p["wo"], 2, (0,)))
            for k, axis, head in (("wv", 2, 1), ("wo", 2, 0), ("bv", 1, 0)):
                if k in p:
                    q[k] = _gather(p[k], axis, vo, head)
            alive = (_nonzero(p["w_gate"], 1) & _nonzero(p["w_up"], 1)) & _nonzero(p["w_down"], 0)
            mlp = torch.nonzero(alive)[:, 0] if bool(alive.any()) else torch.tensor([0])
            q["w_gate"], q["w_up"] = p["w_gate"][:, mlp], p["w_up"][:, mlp]
            q["w_down"] = p["w_down"][mlp]
        else:
            qk = _uniform_keep((_nonzero(p["wq"], 2, (1,)) | _nonzero(p["bq"], 1, (0,)))
                               & (_nonzero(p["wk"], 2, (1,)) | _nonzero(p["bk"], 1, (0,))))
            for k, axis, head in (("wq", 2, 1), ("wk", 2, 1), ("bq", 1, 0), ("bk", 1, 0)):
                q[k] = _gather(p[k], axis, qk, head)
            vo = _uniform_keep((_nonzero(p["wv"], 2, (1,)) | _nonzero(p["bv"], 1, (0,)))
                               & _nonzero(p["wo"], 1, (0,)))
            for k, axis, head in (("wv", 2, 1), ("bv", 1, 0), ("wo", 1, 0)):
                q[k] = _gather(p[k], axis, vo, head)
            alive = (_nonzero(p["w_in"], 1) | (p["b_in"] != 0)) & _nonzero(p["w_out"], 0)
            mlp = torch.nonzero(alive)[:, 0] if bool(alive.any()) else torch.tensor([0])
            q["w_in"], q["b_in"], q["w_out"] = p["w_in"][:, mlp], p["b_in"][mlp], p["w_out"][mlp]
        layers.append(q)
    return {**params, "layers": tuple(layers)}


__all__ = ["pad", "compact"]
