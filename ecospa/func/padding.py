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

from ecospa.func.families import family_of


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


def _by_layer(groups, n_layers: int) -> list:
    """The coupled groups of each layer (members at ("layers", i, leaf)), in layer order."""
    out = [[] for _ in range(n_layers)]
    for g in groups:
        paths = {m.path[:2] for m in g.members}
        if len(paths) != 1 or len(g.members[0].path) != 3 or g.members[0].path[0] != "layers":
            raise ValueError(f"group {g.name!r}: padding needs members at ('layers', i, leaf)")
        out[g.members[0].path[1]].append(g)
    return out


def _check_layers(params: dict, cfg) -> None:
    if len(params["layers"]) != cfg.n_layers:
        raise ValueError(f"the tree has {len(params['layers'])} layers but the config says "
                         f"n_layers={cfg.n_layers}")


def pad(params: dict, cfg) -> tuple:
    """(padded params, cfg for them): dense shapes, same logits. Pure; inputs untouched.

    Every coupled unit goes back to its dense slot: the family's ``slots`` hook where units have
    an order that matters (LLaMA's rotary pairs, by frequency), kept units first otherwise; the
    rest is zero on both sides of the coupled product. Unpruned buffers get their dense value.
    """
    fam = family_of(cfg)
    _check_layers(params, cfg)
    F_ = max([cfg.ffn_dim] + [p[fam.ffn_in].shape[1] for p in params["layers"]])
    sizes = {**fam.unit_sizes(cfg), "mlp": F_}
    layers = []
    for p, groups in zip(params["layers"], _by_layer(fam.coupled_groups(cfg), cfg.n_layers)):
        q, slots = dict(p), fam.slots(p, cfg)
        for g in groups:
            if g.kind not in sizes:
                raise ValueError(f"group {g.name!r}: no dense size for kind {g.kind!r}")
            size, index = sizes[g.kind], slots.get(g.kind)
            for m in g.members:
                if not m.masked:
                    continue  # a buffer: its dense value comes from ``dense_buffers``
                x = p[m.path[2]]
                if x.shape[m.unit_axis] > size:
                    raise ValueError(f"{'.'.join(map(str, m.path))}: a width of {x.shape[m.unit_axis]} "
                                     f"exceeds the dense size {size}")
                if index is None:
                    q[m.path[2]] = _scatter(x, m.unit_axis, torch.arange(x.shape[m.unit_axis],
                                                                          device=x.device), size)
                else:
                    q[m.path[2]] = _scatter(x, m.unit_axis, index.to(x.device), size, m.block_axis)
        q.update(fam.dense_buffers(p, cfg, slots))
        layers.append(q)
    return {**params, "layers": tuple(layers)}, dataclasses.replace(cfg, ffn_dim=F_)


def _nonzero(x: torch.Tensor, axis: int, block_axis=None) -> torch.Tensor:
    """Bool [H, n] (or [n] without a block axis): some entry along the other axes != 0."""
    keep = [a for a in (block_axis, axis) if a is not None]
    dims = [d for d in range(x.ndim) if d not in keep]
    alive = (x != 0).any(dim=dims) if dims else x != 0
    return alive.T if block_axis is not None and block_axis > axis else alive


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
    """The sliced tree of a padded (or masked) one: a unit is removed when one factor of its
    coupled product is all-zero: the members of one side (``a``: Q or V columns and their biases,
    the SwiGLU up columns; ``b``: K, O rows, the MLP's output rows), or the side-less members
    (the SwiGLU gate; GPT-2's MLP input columns with their bias: gelu(0) = 0). Same logits."""
    fam = family_of(cfg)
    _check_layers(params, cfg)
    layers = []
    for p, groups in zip(params["layers"], _by_layer(fam.coupled_groups(cfg), cfg.n_layers)):
        q = dict(p)
        for g in groups:
            factors = {}  # side -> OR over its members; the unit lives only if every factor does
            for m in g.members:
                if m.masked:
                    nz = _nonzero(p[m.path[2]], m.unit_axis, m.block_axis)
                    factors[m.side] = factors[m.side] | nz if m.side in factors else nz
            alive = None
            for nz in factors.values():
                alive = nz if alive is None else alive & nz
            blocked = g.members[0].block_axis is not None
            if blocked:
                keep = _uniform_keep(alive)
            else:
                keep = torch.nonzero(alive)[:, 0] if bool(alive.any()) else torch.tensor([0])
            for m in g.members:
                x = p[m.path[2]]
                q[m.path[2]] = _gather(x, m.unit_axis, keep.to(x.device), m.block_axis if blocked else None)
        layers.append(q)
    return {**params, "layers": tuple(layers)}


__all__ = ["pad", "compact"]
