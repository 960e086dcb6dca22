"""The README's five-line results summary, generated from the same results files as
docs/BENCHMARKS.md (never hand-written: a number here is always the one in the tables)."""
from __future__ import annotations

from typing import Optional


def _speed(res: Optional[dict]) -> Optional[str]:
    rows = [r for r in (res or {}).get("rows", []) if abs(r.get("kept_fraction", 0) - 0.5) < 1e-9]
    if not rows:
        return None
    parts = [f"{r['model']} {r['train_step_eager_speedup']:.2f}x train step / "
             f"{r['prefill_b8_eager_speedup']:.2f}x prefill (FLOP-ideal {r['flop_ideal_speedup']:.2f}x)"
             for r in rows]
    return ("**Speed** (CPU, float32, eager, kept 50% of the coupled units): " + "; ".join(parts) + ".")


def _best_lever(levers: Optional[dict]) -> Optional[tuple]:
    """(name, mean ppl / dense-small at equal steps, mean FLOPs / dense, seeds) of the EcoSpa
    schedule with the lowest mean over its seeds, each against the dense-small of its seed."""
    rows = (levers or {}).get("rows", [])
    small = {r.get("seed", 0): r for r in rows
             if r["variant"] == "dense-small" or r["variant"].startswith("dense-small@seed")}
    dense_flops = (levers or {}).get("conditions", {}).get("dense_train_flops")
    by: dict = {}
    for r in rows:
        s = small.get(r.get("seed", 0))
        if r["variant"].startswith("ecospa") and s and dense_flops:
            by.setdefault(r["variant"].split("-seed")[0], []).append(
                (r["val_ppl"] / s["val_ppl"], r["train_flops"] / dense_flops))
    if not by:
        return None
    name, got = min(by.items(), key=lambda kv: sum(g[0] for g in kv[1]) / len(kv[1]))
    return name, sum(g[0] for g in got) / len(got), sum(g[1] for g in got) / len(got), len(got)


def _pretrain(res: Optional[dict], levers: Optional[dict] = None) -> Optional[str]:
    best = _best_lever(levers)
    if best:
        name, ratio, flops, seeds = best
        return (f"**Pre-training** (small preset, CPU, {seeds} seeds): the best EcoSpa schedule "
                f"(`{name.split('@', 1)[-1]}`) ends at {ratio:.3f}x the val ppl of the dense model of its final "
                f"size at equal steps, with {flops:.3f}x the dense model's training FLOPs: it does not beat "
                "training the small model directly here.")
    table = {r["variant"]: r for r in (res or {}).get("table", [])}
    if "ecospa" not in table or "dense-small" not in table:
        return None
    e = table["ecospa"]
    return (f"**Pre-training** (small preset, CPU): EcoSpa ends at val ppl {e['val ppl']:.3f} = "
            f"{e['ppl / dense-small']:.3f}x the dense model of its final size, with "
            f"{e['FLOPs / dense']:.2f}x the dense model's training FLOPs (dense-small: "
            f"{table['dense-small']['FLOPs / dense']:.2f}x): it does not beat training the small model "
            "directly here.")


# Job fields that do not change what a default job computes (where it writes, what it reports)
NOT_SETTINGS = {"model", "out", "budget", "sparsity", "steps", "eval_at", "progress", "overwrite", "export_hf",
                "export", "export_format", "eval_cache", "ppl_dense", "ppl_dense_extra"}


# Job fields added later whose default reproduces what the job did before they existed: a row
# recorded without one ran at its default. (Not so for a field whose default changed the job, such
# as obs_ridge: a row without it is not at the current defaults.)
ADDED_AS_BEFORE = ("calib_text", "recovery_dtype")


def _at_defaults(levers: Optional[dict], steps: int = 80) -> list:
    """(fraction removed, pydoc, stdlib, dense pydoc, dense stdlib) of each row of
    results/compress_levers28.json run at the job's CURRENT defaults with a number at ``steps``
    recovery steps (the end of an 80-step job, or the step-80 point of a longer one's curve)."""
    import dataclasses
    import json
    from ecospa.jobs.compress_job import Job
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(Job)
                                      if f.name not in NOT_SETTINGS}))
    got = {}
    for r in (levers or {}).get("rows", []):
        job = {**{k: defaults[k] for k in ADDED_AS_BEFORE}, **r.get("job", {})}
        if job.get("budget") is None or any(job.get(k) != v for k, v in defaults.items()):
            continue
        if job.get("steps") == steps:
            pydoc, stdlib = r["ppl_recovered"], r["ppl_extra"].get("stdlib")
        else:
            pt = [c for c in r.get("curve", []) if c["step"] == steps]
            if not pt:
                continue
            pydoc, stdlib = pt[0]["ppl"], pt[0]["ppl_extra"].get("stdlib")
        if stdlib is not None:
            got[job["budget"]] = (job["budget"], pydoc, stdlib, r["ppl_dense"], r["ppl_dense_extra"]["stdlib"])
    return [got[k] for k in sorted(got)]


def _compress(res: Optional[dict], dedup: Optional[dict], levers: Optional[dict] = None) -> Optional[str]:
    rows = _at_defaults(levers)
    if rows:
        parts = [f"{b:.0%} removed: pydoc val {dp:.2f} -> {p:.2f}, stdlib val {ds:.2f} -> {st:.2f} ({st / ds:.3f}x)"
                 for b, p, st, dp, ds in rows]
        return ("**Compression** (SmolLM2-135M, the job's current defaults, 80 recovery steps, deduplicated "
                "split; results/compress_levers28.json): " + "; ".join(parts) + ".")
    src = dedup if dedup and dedup.get("recovery") else res
    rows = [r for r in (src or {}).get("recovery", []) if r.get("variant") == "job-default"]
    if not rows:
        return None
    dense = src["dense"]
    parts = [f"{r['level']:.0%} removed: pydoc val {dense['pydoc']:.2f} -> {r['ppl_recovered']:.2f}, "
             f"stdlib val {dense['stdlib']:.2f} -> {r['ppl_stdlib']:.2f} ({r['ppl_stdlib'] / dense['stdlib']:.2f}x)"
             for r in sorted(rows, key=lambda r: r["level"])]
    split = "deduplicated split" if src is dedup else "old split"
    return (f"**Compression** (SmolLM2-135M, the job's defaults, {rows[0]['steps']} recovery steps, "
            f"{split}): " + "; ".join(parts) + ".")


def _decode(res: Optional[dict]) -> Optional[str]:
    rows = [r for r in (res or {}).get("rows", []) if r.get("variant") == "pruned 50%"]
    if not rows:
        return None
    parts = [f"batch {r['batch']}: {r['speedup_vs_ecospa_dense']:.2f}x (ideal {r['ideal_speedup']:.2f}x)"
             for r in rows]
    return "**Decode** (SmolLM2-135M pruned 50% vs dense, CPU): " + "; ".join(parts) + "."


def _export(res: Optional[dict]) -> Optional[str]:
    if not res or not res.get("formats"):
        return None
    worst = max(r["max_abs_logit_diff"] for r in res["formats"].values())
    held = ", ".join(f"{fmt} {r['params'] / 1e6:.1f}M" for fmt, r in res["formats"].items())
    return (f"**Export** (SmolLM2-135M, {res['pruned_params'] / 1e6:.1f}M of {res['dense_params'] / 1e6:.1f}M "
            f"parameters kept): {', '.join(res['formats'])} reload with logits within {worst:.1e} of "
            f"ecospa's; parameters held by the runtime: {held}.")


def summary_lines(speed, pretrain, compress, dedup, generate, export, levers=None, levers28=None) -> str:
    """Up to five lines, one per results file that exists (pre-training: the issue-27 levers'
    file ``levers`` when given, else ``pretrain``; compression: the rows of ``levers28`` at the
    job's current defaults when there are any, else ``dedup`` / ``compress``)."""
    lines = [f(*a) for f, a in ((_speed, (speed,)), (_pretrain, (pretrain, levers)),
                                (_compress, (compress, dedup, levers28)),
                                (_decode, (generate,)), (_export, (export,)))]
    return "\n".join(f"- {x}" for x in lines if x) + "\n"


__all__ = ["summary_lines"]
