"""Layer-wise reconstruction of a pruned model: refit each output projection by ridge least squares.

    params = reconstruct(pruned, dense, cfg, batches)        # pure: inputs untouched

For every layer in order and each of its two residual sublayers (``Family.sublayers``, ``ecospa.func._block``):
the pruned model's inner activations H [N, K] (K = the KEPT value dims of every query head, or
the kept MLP neurons) are computed on the pruned model's own inputs, which already went through
the refit earlier layers; the target is what the DENSE model's residual stream holds after the
same sublayer. The output projection W [K, D] (and the output bias, where the family has one)
is refit to

    W' = argmin ||H W' - Y||^2 + lam ||W' - W||^2 = (HᵀH + lam I)^-1 (HᵀY + lam W)

with lam = ``ridge`` x mean(diag HᵀH). Targets (``target=``):
  "residual"  Y = y_dense - x_pruned: the sublayer also repairs the error of everything before
              it (the residual stream is pulled back onto the dense one);
  "local"     Y = the dense sublayer's branch on the pruned model's inputs (classic layer-wise).
HᵀH and HᵀY are accumulated batch by batch in float64 (each 1024-row block's product in float32); only the [N, D] residual streams and the
current sublayer's inner activations are kept (never all layers' activations). Because W itself is a feasible
point, the refit never increases the calibration error ||H W - Y||^2 of a sublayer.

No gradients, no training: about two forward passes over the calibration tokens plus one
K x K solve per sublayer. Nothing is pruned here: the kept units are the pruned tree's.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch

from ecospa.func.families import family_of
from ecospa.func._block import Sublayer
from ecospa.groups import validate
from ecospa.prune import _check_keep, slice_units
from ecospa.select import keep_top

TARGETS = ("residual", "local")


def ridge_solve(gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor, ridge: float) -> torch.Tensor:
    """(G + lam I)^-1 (C + lam W), lam = ridge * mean(diag G) (float64; G [K, K], C and W [K, D])."""
    gram, cross, w = gram.double(), cross.double(), w.double()
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    a = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    b = cross + lam * w
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    return torch.linalg.lstsq(a, b).solution  # numerically indefinite: least squares instead


def _check(params: dict, dense: dict, cfg, batches) -> list:
    fam = family_of(cfg)
    if not isinstance(params, dict) or not isinstance(dense, dict) or "layers" not in params \
            or "layers" not in dense:
        raise ValueError("reconstruct needs two parameter trees of the model family (dicts with 'layers')")
    if len(params["layers"]) != len(dense["layers"]):
        raise ValueError(f"pruned and dense trees do not match: {len(params['layers'])} vs "
                         f"{len(dense['layers'])} layers; pass the dense model the pruned one came from")
    if params[fam.embed_leaf].shape != dense[fam.embed_leaf].shape:
        raise ValueError(f"pruned and dense trees do not match: embedding {tuple(params[fam.embed_leaf].shape)} "
                         f"vs {tuple(dense[fam.embed_leaf].shape)}")
    for i, (p, d) in enumerate(zip(params["layers"], dense["layers"])):
        for s in fam.sublayers:
            kp, kd = s.weight(p).shape, s.weight(d).shape
            if kp[1] != kd[1] or kp[0] > kd[0]:
                raise ValueError(f"pruned and dense trees do not match at layers.{i}.{s.out}: "
                                 f"{tuple(p[s.out].shape)} is not a pruned {tuple(d[s.out].shape)}")
    batches = [torch.as_tensor(b) for b in batches]
    if not batches:
        raise ValueError("reconstruct needs at least one calibration batch of token ids [B, T]")
    for b in batches:  # an encoder's inputs (images) are checked by its embed
        if fam.decoder and (b.ndim != 2 or b.is_floating_point()):
            raise ValueError(f"calibration batches must be integer token ids [B, T], got {tuple(b.shape)} "
                             f"{b.dtype}")
    return batches


def _check_options(target: str, **ridges) -> None:
    """ValueError unless every ridge is a number > 0 and ``target`` is one of TARGETS."""
    for name, value in ridges.items():
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            raise ValueError(f"{name} must be a number > 0 (relative to the Gram's mean diagonal), got {value!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def _by_layer(groups) -> dict:
    """{layer index: the groups of that layer} (a group lives in one layer)."""
    out = {}
    for g in groups:
        out.setdefault(int(g.members[0].path[1]), []).append(g)
    return out


def _embedder(fam):
    """(params, tokens, cfg) -> the first layer's input [B, T, D]."""
    return lambda params, tokens, cfg: fam.embed(params, tokens, None, cfg)


GRAM_ROWS = 1024  # rows per float32 product before it is added to the float64 sum


def _gram(h: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
    """hᵀy (hᵀh without ``y``) for h [N, K], y [N, D], summed in float64 over blocks of
    ``GRAM_ROWS`` rows, each block's product in the inputs' own dtype (float32: twice the speed of
    a float64 product on CPU; the rounding of a 1024-term float32 sum is ~1e-6 of its terms'
    magnitude, far below the ridge's effect on the solve)."""
    dt = torch.promote_types(h.dtype, torch.float32)  # bfloat16 activations: float32 products
    out = None
    for a in range(0, h.shape[0], GRAM_ROWS):
        hb = h[a:a + GRAM_ROWS].to(dt)
        prod = (hb.T @ (hb if y is None else y[a:a + GRAM_ROWS].to(dt))).double()
        out = prod if out is None else out.add_(prod)
    return out


def _finite(x: torch.Tensor, where: str, during: str = "reconstruction") -> torch.Tensor:
    if not torch.isfinite(x).all():
        raise ValueError(f"non-finite activations at {where} during {during}; the model or "
                         "the calibration batch is broken (NaN/inf weights?)")
    return x


def reconstruct(params: dict, dense: dict, cfg, batches: Sequence[torch.Tensor], *,
                ridge: float = 1e-2, target: str = "residual", bias: bool = True,
                on_layer: Optional[Callable[[int, int], None]] = None, donate: bool = False,
                cache_inner: bool = True) -> dict:
    """The pruned ``params`` with every output projection refit to the ``dense`` model (see the
    module doc). ``batches``: calibration token ids [B, T] (TRAIN text only). ``bias``: refit the
    output bias too where the family has one. ``on_layer(i, n)`` is called after each layer.
    ``donate=True``: the refit weights are written into ``params``' own output leaves (the same
    result without a second copy of them while the caller still holds ``params``; ``params``
    must not be read afterwards); a leaf whose storage ``dense`` also uses is never written.
    ``cache_inner=False``: each sublayer's inner activations are computed again after its solve
    instead of kept for every batch (the same numbers; less memory, more time).

    Example: ``params = reconstruct(slice_units(dense, groups, keep), dense, cfg, calib)``
    """
    _check_options(target, ridge=ridge)
    batches = _check(params, dense, cfg, batches)
    fam = family_of(cfg)
    subs, embed = fam.sublayers, _embedder(fam)
    layers = [dict(p) for p in params["layers"]]
    with torch.no_grad():
        xp = [embed(params, b, cfg) for b in batches]
        xd = [embed(dense, b, cfg) for b in batches]
        for i, d in enumerate(dense["layers"]):
            p = layers[i]
            for s in subs:
                _refit_sublayer(p, d, s, cfg, xp, xd, f"layers.{i}.{s.name}", ridge=ridge, target=target,
                                bias=bias, donate=donate, cache_inner=cache_inner, move_dense=True)
            if on_layer is not None:
                on_layer(i, len(layers))
    return {**params, "layers": tuple(layers)}


def _refit_sublayer(p: dict, d: dict, s: Sublayer, cfg, xp: list, xd: list, where: str, *, ridge: float,
                    target: str, bias: bool, donate: bool, cache_inner: bool, move_dense: bool,
                    intact: tuple = ()) -> None:
    """Refit sublayer ``s`` of the pruned layer ``p`` (written into ``p``) to the dense layer ``d``
    on every batch's residual streams: ``xp`` (the pruned model's) is moved past the refit
    sublayer; ``xd`` (the dense model's) too when ``move_dense``, else it already holds the dense
    stream after ``s``. ``donate``: the refit values are written into ``p``'s own leaves, unless
    their storage is ``d``'s or that of a layer in ``intact``."""
    w = s.weight(p)
    with_bias = bias and s.bias is not None
    k = w.shape[0] + with_bias
    gram = torch.zeros(k, k, dtype=torch.float64)
    cross = torch.zeros(k, w.shape[1], dtype=torch.float64)
    inner = []  # this sublayer's inner activations, reused after the solve
    for j in range(len(xp)):
        if target == "local":
            y = s.apply(d, s.inner(d, xp[j], cfg))
        if move_dense:
            xd[j] = xd[j] + s.apply(d, s.inner(d, xd[j], cfg))  # the dense stream moves on
        h = s.inner(p, xp[j], cfg)
        inner.append(h if cache_inner else None)
        h = h.reshape(-1, w.shape[0])
        if target == "residual":
            y = xd[j] - xp[j]
        if s.bias is not None and not with_bias:
            y = y - p[s.bias]  # the kept bias is part of the branch, not refit
        y = y.reshape(-1, w.shape[1])
        if with_bias:
            h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=h.dtype)], 1)
        gram += _gram(h)
        cross += _gram(h, y)
    # a NaN/inf activation or target reaches the sums: one check of [K, K + D] numbers
    # instead of two passes over every batch's [N, K] and [N, D]
    _finite(gram, where)
    _finite(cross, where)
    w0 = torch.cat([w, p[s.bias][None]]) if with_bias else w
    w_new = ridge_solve(gram, cross, w0, ridge).to(w.dtype)

    def own(leaf):
        return donate and not any(_shares(p[leaf], o[leaf]) for o in (d, *intact))

    if with_bias:
        p[s.bias] = _put(p[s.bias], w_new[-1], own(s.bias))
        w_new = w_new[:-1]
    p[s.out] = _put(p[s.out], w_new, own(s.out))
    for j, h in enumerate(inner):  # the inner does not read W_out
        xp[j] = xp[j] + s.apply(p, s.inner(p, xp[j], cfg) if h is None else h)
        inner[j] = None


def _spd_inverse(a: torch.Tensor) -> torch.Tensor:
    """The inverse of a symmetric positive definite ``a`` by Cholesky (half the work of LU), or by
    LU when ``a`` is numerically not positive definite."""
    chol, info = torch.linalg.cholesky_ex(a)
    if int(info) == 0:
        return torch.cholesky_inverse(chol)
    return torch.linalg.inv(a)


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _put(old: torch.Tensor, new: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``new`` in ``old``'s shape: written into ``old`` itself when ``inplace``, else a new tensor
    (the bias row cloned out of the solve's result, the weight rows kept where they are: a
    ``clone`` of those moves them to another allocation, and the next sublayer's matmuls then
    differ in the last bits from the in-place refit's, which the tests compare bit for bit)."""
    if inplace:
        return old.copy_(new.reshape(old.shape))
    return new.reshape(old.shape).clone() if new.ndim == 1 else new.reshape(old.shape).contiguous()


def _unit_rows(group, sub: Sublayer, p: dict) -> Optional[torch.Tensor]:
    """Rows of ``sub``'s [K, D] output matrix that belong to each unit of ``group``: [blocks,
    units, rows per unit], or None when the group has no member on that output leaf."""
    for m in group.members:
        if m.path[-1] == sub.out:
            leaf = p[sub.out]
            idx = torch.arange(leaf[..., 0].numel()).reshape(leaf.shape[:-1])
            front = ([m.block_axis] if m.block_axis is not None else []) + [m.unit_axis]
            rest = [a for a in range(idx.ndim) if a not in front]
            idx = idx.permute(*front, *rest)
            return idx.reshape(*idx.shape[:len(front)], -1) if m.block_axis is not None \
                else idx.reshape(1, idx.shape[0], -1)
    return None


def _obs_of(gram: torch.Tensor, w: torch.Tensor, groups, s: Sublayer, layer: dict, ridge: float,
            where: str) -> dict:
    """The obs scores {name: [blocks, units]} of those ``groups`` that end in sublayer ``s``'s
    output projection ``w`` [K, D] (float64), from the Gram ``gram`` [K, K] of its dense inner
    activations (see ``obs_scores``)."""
    _finite(gram, where, "the obs scores")
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    hinv = _spd_inverse(gram + lam * torch.eye(gram.shape[0], dtype=torch.float64))
    out = {}
    for g in groups:
        rows = _unit_rows(g, s, layer)
        if rows is None:
            continue
        sub_inv = hinv[rows[..., :, None], rows[..., None, :]]  # [B, U, r, r]
        ws = w[rows]                                             # [B, U, r, D]
        sol = torch.linalg.solve(sub_inv, ws)
        out[g.name] = (ws * sol).sum((-1, -2))                   # [B, U]
    return out


def obs_scores(dense: dict, cfg, groups, batches: Sequence[torch.Tensor], *,
               ridge: float = 1e-2, on_layer: Optional[Callable[[int, int], None]] = None) -> dict:
    """Compensation-aware scores: for each group that ends in an output projection (vo, mlp), the
    calibration error that REMAINS when unit u alone is removed and the other units' output
    weights are refit (optimal brain surgeon on the layer's Gram H = Σ hhᵀ of the dense inner
    activations): tr(W_Sᵀ [(H + lam I)^-1_SS]^-1 W_S) over the unit's rows S. Higher = keep.
    Groups with no output-projection member (qk) are absent: score them another way.
    ``on_layer(i, n)`` is called after each layer (as in ``reconstruct``).
    """
    batches = _check(dense, dense, cfg, batches)
    fam = family_of(cfg)
    subs, embed = fam.sublayers, _embedder(fam)
    by_layer, out = _by_layer(groups), {}
    with torch.no_grad():
        xd = [embed(dense, b, cfg) for b in batches]
        for i, d in enumerate(dense["layers"]):
            for s in subs:
                w = s.weight(d).double()
                gram = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64)
                for j in range(len(batches)):
                    h = s.inner(d, xd[j], cfg)
                    gram += _gram(h.reshape(-1, w.shape[0]))
                    xd[j] = xd[j] + s.apply(d, h)  # one residual stream per batch, replaced in place
                out.update(_obs_of(gram, w, by_layer.get(i, []), s, d, ridge, f"layers.{i}.{s.name}"))
            if on_layer is not None:
                on_layer(i, len(dense["layers"]))
    return out


class ObsRefit(NamedTuple):
    """What ``obs_refit`` returns."""

    params: dict             # the pruned model, its output projections refit
    pruned: Optional[dict]   # the same before the refit (``keep_pruned=True``), else None
    keep: dict               # {group: kept units [blocks, k]}: the obs scores' for vo/mlp
    obs: dict                # {group: obs scores [blocks, units]} of the groups ending in an output


def obs_refit(source: dict, dense: dict, cfg, groups, batches: Sequence[torch.Tensor], keep: dict, *,
              ridge: float = 1e-2, obs_ridge: Optional[float] = None, target: str = "residual",
              bias: bool = True, keep_pruned: bool = False, cache_inner: bool = True, release: bool = False,
              on_layer: Optional[Callable[[int, int], None]] = None) -> ObsRefit:
    """``obs_scores`` on ``source``, the choice of units, ``slice_units`` and ``reconstruct`` to
    ``dense`` in ONE pass over the layers and batches: layer i's groups are chosen and sliced as
    soon as its obs scores are known (the scores of layer i read only the source's stream up to
    layer i), and its sublayers are refit at once. When ``source is dense`` (one round, or the
    first) the source's residual stream IS the refit's dense target stream, so the dense model
    runs once instead of twice; the result equals the separate calls::

        obs = obs_scores(source, cfg, groups, batches, ridge=obs_ridge)
        keep = {**keep, **{g: keep_top(obs[g], keep[g].shape[1]) for g in obs}}
        params = reconstruct(slice_units(source, groups, keep), dense, cfg, batches, ridge=ridge)

    ``keep``: every group's kept units as chosen without the obs scores; for the groups the obs
    scores rank (vo, mlp) only their number per block is used. ``obs_ridge``: the obs scores'
    ridge (None: ``ridge``). ``keep_pruned``: also return the sliced model before the refit (it
    shares every leaf with the result except the refit output projections, copied before the
    refit writes them). Inputs untouched,
    unless ``release=True``: the caller hands the two trees over, their ``"layers"`` given as
    LISTS, and each layer's entry is set to None once the pass is past it, so a dense layer is freed
    as soon as its pruned layer exists (the peak holds about one model, not the dense and the pruned
    one; the caller must hold no other reference to the layers and must not read the trees after).
    """
    obs_ridge = ridge if obs_ridge is None else obs_ridge
    _check_options(target, ridge=ridge, obs_ridge=obs_ridge)
    if release and not (isinstance(source["layers"], list) and isinstance(dense["layers"], list)):
        raise ValueError("release=True empties the trees' layers as the pass goes: hand them over as lists, "
                         "e.g. {**tree, 'layers': list(tree['layers'])}")
    batches = _check(source, dense, cfg, batches)
    _check_keep(groups, keep, validate(source, groups))
    fam = family_of(cfg)
    embed, by_layer = _embedder(fam), _by_layer(groups)
    keep, scores = dict(keep), {}
    layers, before = list(source["layers"]), []  # before: each layer's output projections before the refit
    with torch.no_grad():
        xs = [embed(source, b, cfg) for b in batches]           # the source's stream: obs Grams
        xd = xs if source is dense else [embed(dense, b, cfg) for b in batches]  # the refit's target
        xp = list(xs)                                           # the pruned model's stream
        for i in range(len(layers)):
            # one layer in its own frame: nothing of the source's or dense layer i outlives it
            layers[i], old = _obs_refit_layer(i, source, dense, layers, cfg, by_layer.get(i, []), keep, scores,
                                              (xs, xd, xp), ridge=ridge, obs_ridge=obs_ridge, target=target,
                                              bias=bias, cache_inner=cache_inner, keep_pruned=keep_pruned)
            before.append(old)
            if release:
                source["layers"][i] = dense["layers"][i] = None
            if on_layer is not None:
                on_layer(i, len(layers))
    params = {**source, "layers": tuple(layers)}
    pruned = {**params, "layers": tuple({**p, **old} for p, old in zip(layers, before))} if keep_pruned else None
    return ObsRefit(params, pruned, keep, scores)


def _obs_refit_layer(i: int, source: dict, dense: dict, layers: list, cfg, mine: list, keep: dict, scores: dict,
                     streams: tuple, *, ridge: float, obs_ridge: float, target: str, bias: bool,
                     cache_inner: bool, keep_pruned: bool) -> tuple:
    """Layer i of ``obs_refit``: its obs scores (into ``scores``), its groups' kept units (into
    ``keep``), sliced, its sublayers refit; the streams moved past it. Returns (the refit layer,
    {leaf: its value before the refit} of the refit leaves when ``keep_pruned``, else {})."""
    xs, xd, xp = streams
    src, d, subs = source["layers"][i], dense["layers"][i], family_of(cfg).sublayers
    # the sublayer whose output projection each group ends in (None: not ranked by obs)
    ends = {g.name: _first_end(g, subs, src) for g in mine}
    p, sliced, old = dict(src), set(), {}
    for k, s in enumerate(subs):
        where = f"layers.{i}.{s.name}"
        ranked = [g for g in mine if ends[g.name] == k]
        w = s.weight(src).double() if ranked else None
        gram = torch.zeros(w.shape[0], w.shape[0], dtype=torch.float64) if ranked else None
        for j in range(len(xs)):
            h = s.inner(src, xs[j], cfg)
            if ranked:
                gram += _gram(h.reshape(-1, gram.shape[0]))
            xs[j] = xs[j] + s.apply(src, h)
        if xd is not xs:
            for j in range(len(xd)):
                xd[j] = xd[j] + s.apply(d, s.inner(d, xd[j], cfg))
        if ranked:
            got = _obs_of(gram, w, ranked, s, src, obs_ridge, where)
            scores.update(got)
            keep.update({n: keep_top(v, keep[n].shape[1]) for n, v in got.items()})
        ready = [g for g in mine if g.name not in sliced and (ends[g.name] is None or ends[g.name] <= k)]
        if ready:  # their kept units are final: slice them out of this layer
            layers[i] = p
            p = dict(slice_units({**source, "layers": tuple(layers)}, ready, keep)["layers"][i])
            sliced.update(g.name for g in ready)
        if keep_pruned:  # a copy: the refit writes in place, and with release the source is gone after
            old.update({leaf: p[leaf].clone() for leaf in (s.out, s.bias) if leaf is not None})
        _refit_sublayer(p, d, s, cfg, xp, xd, where, ridge=ridge, target=target, bias=bias,
                        donate=True, cache_inner=cache_inner, move_dense=False, intact=(src,))
    return p, old


def _first_end(group, subs, layer: dict) -> Optional[int]:
    """The index of the first sublayer whose output projection ``group`` has a member on, or None."""
    for k, s in enumerate(subs):
        if _unit_rows(group, s, layer) is not None:
            return k
    return None


__all__ = ["reconstruct", "ridge_solve", "obs_scores", "obs_refit", "ObsRefit", "TARGETS"]
