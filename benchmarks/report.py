"""Regenerate the result tables (and the plots) from benchmarks/results/*.json.

    python benchmarks/report.py            # rewrites the marked sections of docs/BENCHMARKS.md and
                                           # the README's five-line summary, writes PNGs

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in
docs/BENCHMARKS.md (the summary in README.md); only those sections change. A results file that is
missing leaves its section as it is.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from speed_report import plot_speed, speed_table  # noqa: E402  (the speed sections)
from split_report import split_section  # noqa: E402  (old split -> deduplicated split)
from summary_report import summary_lines  # noqa: E402  (the README's five lines)
from levers28_report import levers28_section  # noqa: E402  (issue 28's lever runs)


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _cond_line(c: dict) -> str:
    keep = ("device", "gpu", "dtype", "torch", "torch_threads", "cpu_count", "seq", "train_batch", "reps", "time")
    return "Conditions: " + ", ".join(f"{k}={c[k]}" for k in keep if k in c)


def generic_table(res: dict) -> str:
    """Results files that carry their own ready-made 'table' rows: list of dicts."""
    rows = res.get("table") or []
    if not rows:
        return ""
    keys = list(rows[0])
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join([_cond_line(res.get("conditions", {})), "", *out])


ABLATION_LABELS = {
    "fisher": "coupled Fisher, global budget (no refit)",
    "uniform": "coupled Fisher, same fraction per group (no refit)",
    "fisher+refit": "coupled Fisher + layer-wise ridge refit",
    "obs+refit": "Fisher counts, units by error after refit (obs) + refit",
    "zscore+obs+refit": "z-scored counts (FLAP) + obs + refit",
    "protect+obs+refit": "first/last layers dense (LLM-Pruner) + obs + refit",
    "depth+obs+refit": "fraction growing with depth (SlimGPT) + obs + refit",
    "obs+refit+4xdata": "obs + refit on 4x the refit tokens (32 x 4 x 256)",
    "obs+refit+ridge0.1": "obs + refit, ridge 0.1 (10x the protocol's 0.01)",
    "obs+refit+ridge1": "obs + refit, ridge 1 (100x the protocol's 0.01)",
    "obs+refit+8xdata": "obs + refit on 8x the refit tokens (64 x 4 x 256)",
    "obs+refit+4xdata+ridge0.1": "obs + refit on 4x the refit tokens, ridge 0.1",
    "obs+refit+4xdata+ridge1": "obs + refit on 4x the refit tokens, ridge 1",
}


def _tp_best(res: dict) -> dict:
    """Torch-Pruning's best perplexity per (level, steps) over its criteria (inner mode, full level)."""
    best = {}
    for r in res.get("peers", []):
        if r.get("mode", "inner") != "inner" or abs(r.get("block_fraction_removed", r["level"]) - r["level"]) > 0.01:
            continue
        best[(r["level"], 0)] = min(best.get((r["level"], 0), float("inf")), r["ppl_pruned"])
        if r.get("ppl_recovered") is not None:
            key = (r["level"], r["steps"])
            best[key] = min(best.get(key, float("inf")), r["ppl_recovered"])
        for steps, ppl in (r.get("ppl_at_steps") or {}).items():
            best[(r["level"], int(steps))] = min(best.get((r["level"], int(steps)), float("inf")), ppl)
    return best


RECIPE_LABELS = {
    "job-default": "`ecospa compress` defaults: Fisher counts, units by obs, refit on 32 batches (ridge 0.1), "
                   "80 steps KL + CE",
    "distill": "Fisher units, no refit, 80 steps KL + CE (recovery alone)",
}
# (lever, row without it, row with it): rows are ablation variants or "recipe:NAME" recovery rows
LEVERS = (
    ("global budget instead of the same fraction per group", "uniform", "fisher"),
    ("layer-wise ridge refit", "fisher", "fisher+refit"),
    ("units chosen by their error after the refit (obs)", "fisher+refit", "obs+refit"),
    ("z-scored counts (FLAP) instead of the global budget", "obs+refit", "zscore+obs+refit"),
    ("first/last layers dense (LLM-Pruner)", "obs+refit", "protect+obs+refit"),
    ("fraction growing with depth (SlimGPT)", "obs+refit", "depth+obs+refit"),
    ("80 distilled recovery steps alone", "fisher", "recipe:distill"),
    ("all together: the job's defaults, 80 steps", "fisher", "recipe:job-default"),
)


def compress_section(res: dict) -> str:
    """The README's compression section: ONE invocation of benchmarks/compress.py (one results file)."""
    if not res or not (res.get("ablation") or res.get("recovery")):
        return "(no results: run benchmarks/compress.py)"
    c = res["conditions"]
    return (f"One invocation, `{c.get('command', '?')}` (results/compress.json; "
            f"{c.get('workers', 1)} worker process(es) of {c.get('threads')} thread(s), "
            f"wall {res.get('wall_seconds', 0) / 60:.0f} min).\n\n" + compress_table(res))


# issue 12's targets for the job's defaults: (level, what, bound); "stdlib" bounds are ratios to dense
COMPRESS_TARGETS = ((0.5, "after pruning and refit", 35.0), (0.5, "after recovery", 16.5),
                    (0.5, "after recovery / Torch-Pruning's best", 0.65), (0.5, "stdlib after recovery / dense", 1.5),
                    (0.25, "after pruning and refit", 16.5), (0.25, "after recovery", 14.8))


def compress_verdict(res: dict) -> list:
    """The job-default rows against the targets, each met or MISSED with the measured value."""
    best, out = _tp_best(res), []
    rows = {r["level"]: r for r in res.get("recovery", []) if r["variant"] == "job-default"}
    for level, what, bound in COMPRESS_TARGETS:
        r = rows.get(level)
        if r is None:
            continue
        value = {"after pruning and refit": r.get("ppl_reconstructed") or r["ppl_pruned"],
                 "after recovery": r["ppl_recovered"],
                 "stdlib after recovery / dense": r["ppl_stdlib"] / res["dense"]["stdlib"]}.get(what)
        if what.startswith("after recovery / Torch"):
            tp = best.get((level, r["steps"]))
            value = r["ppl_recovered"] / tp if tp else None
        if value is not None:
            out.append(f"{level:.0%} removed, {what} <= {bound:g}: {value:.3f} "
                       + ("(met)" if value <= bound else "(**MISSED**)"))
    return out


def _lever_rows(res: dict) -> list:
    """Each lever's effect: the row without it -> the row with it, per level and held-out text."""
    got = {}
    for r in res.get("ablation", []):
        if "error" not in r:
            got[(r["variant"], r["level"])] = (r["ppl_pydoc"], r["ppl_stdlib"])
    for r in res.get("recovery", []):
        got[("recipe:" + r["variant"], r["level"])] = (r["ppl_recovered"], r["ppl_stdlib"])
    out = []
    for level in sorted({lv for _, lv in got}, reverse=True):
        for label, a, b in LEVERS:
            if (a, level) in got and (b, level) in got:
                (pa, sa), (pb, sb) = got[(a, level)], got[(b, level)]
                out.append(f"| {level:.0%} | {label} | {pa:.2f} → {pb:.2f} ({pb / pa:.2f}x) | "
                           f"{sa:.2f} → {sb:.2f} ({sb / sa:.2f}x) |")
    return out


def compress_table(res: dict, peers_note: bool = True) -> str:
    """One results file: its ablation rows, its recovery runs, each lever's effect, Torch-Pruning's best."""
    if "ablation" not in res:  # a file from before the ablation layout: nothing consistent to show
        return "(results file predates the ablation layout; rerun benchmarks/compress.py)"
    dense = res["dense"]
    c = res["conditions"]
    best = _tp_best(res)

    def ratio(x, d):
        return f"{x:.2f} ({x / dense[d]:.2f}x)"

    def tp(level, steps, x):
        b = best.get((level, steps))
        return f"{x / b:.3f}" if b else "—"

    out = [f"Dense SmolLM2-135M: pydoc val {dense['pydoc']:.3f}, stdlib val {dense['stdlib']:.3f}."
           + ("" if res.get("complete") else f" **Run incomplete: {res.get('stopped', 'rows so far')}.**"),
           ]
    if res["ablation"]:
        out += ["", "Right after pruning (no training; ppl and its ratio to dense on each held-out text):", "",
                "| removed | method | params kept | pydoc val | ÷ TP best | stdlib val (2nd domain) |",
                "|---|---|---|---|---|---|"]
    for r in sorted(res["ablation"], key=lambda r: (-r["level"], list(ABLATION_LABELS).index(r["variant"]))):
        if "error" in r:  # the variant does not apply at this level (its message, shortened)
            out.append(f"| {r['level']:.0%} | {ABLATION_LABELS.get(r['variant'], r['variant'])} | — | "
                       f"not applicable: {r['error'][:90]} | — | — |")
            continue
        out.append(f"| {r['level']:.0%} | {ABLATION_LABELS.get(r['variant'], r['variant'])} | "
                   f"{r['kept_params'] / 1e6:.1f}M | {ratio(r['ppl_pydoc'], 'pydoc')} | "
                   f"{tp(r['level'], 0, r['ppl_pydoc'])} | {ratio(r['ppl_stdlib'], 'stdlib')} |")
    if res.get("recovery"):
        out += ["", "With recovery (`ecospa compress` jobs; the job's own numbers, pydoc val unless named):", "",
                "| removed | recipe | after pruning | after refit | curve (step: pydoc / stdlib) "
                "| after recovery: pydoc val | ÷ TP best | stdlib val (2nd domain) | job time |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(res["recovery"], key=lambda r: (-r["level"], r["variant"], r["steps"])):
            refit = f"{r['ppl_reconstructed']:.2f}" if r.get("ppl_reconstructed") else "—"
            n = r.get("job", {}).get("recon_batches")
            recipe = RECIPE_LABELS.get(r["variant"], r["variant"] + (f" (refit/obs on {n} batches)" if n else ""))
            curve = "; ".join(f"{p['step']}: {p['ppl']:.2f} / {p['ppl_extra']['stdlib']:.2f}"
                              for p in r.get("curve") or []) or "—"
            out.append(f"| {r['level']:.0%} | {recipe} | {r['ppl_pruned']:.2f} | {refit} | {curve} | "
                       f"{ratio(r['ppl_recovered'], 'pydoc')} (step {r['steps']}) | "
                       f"{tp(r['level'], r['steps'], r['ppl_recovered'])} | "
                       f"{ratio(r['ppl_stdlib'], 'stdlib')} | {r['seconds'] / 60:.1f} min"
                       + (f" (load {r['load_average']:.1f} at its end)" if r.get("load_average") is not None else "")
                       + " |")
    levers = _lever_rows(res)
    if levers:
        out += ["", "Each lever alone (the row without it → the row with it; the ratio < 1 is a gain):", "",
                "| removed | lever | pydoc val | stdlib val (2nd domain) |", "|---|---|---|---|", *levers]
    verdict = compress_verdict(res)
    if verdict:
        out += ["", "The job's defaults against the targets (pydoc val ppl unless named): " + "; ".join(verdict) + "."]
    peers = sorted({(k[0], k[1]): v for k, v in best.items()}.items())
    if peers and peers_note:
        pc = res.get("peers_conditions") or {}
        out += ["", "Torch-Pruning (DepGraph), best of its criteria at each level and step count: "
                + ", ".join(f"{lv:.0%}/{st} steps: {v:.2f}" for (lv, st), v in peers)
                + f" (measured in an earlier run: eval {pc.get('eval', '?')}; recovery {pc.get('recovery', '?')})."]
    ev = c.get("eval", {})
    out += ["", f"Evaluation: {'; '.join(ev.values()) if isinstance(ev, dict) else ev}. "
                f"Calibration: {c.get('calibration', '?')} (the protocol of the ablation rows; each recipe "
                f"names its own). Recovery: {c.get('recovery', '?')}. "
                f"Threads {c.get('threads')} per process, {c.get('workers', 1)} process(es) at once, "
                f"load average at start {c.get('load_average_at_start', 0):.1f}. "
                + (f"Commands (appended runs): {'; '.join(f'`{x}`' for x in c['commands'])}." if c.get("commands")
                   else f"Command: `{c.get('command', '?')}`.")]
    return "\n".join(out)


def plot_quality(compress: dict, pretrain: dict, path: str) -> None:
    """Perplexity vs kept parameters: SmolLM2 compression (left) and tiny pre-training (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    series = {}
    for r in (compress or {}).get("ablation", []):
        if "error" in r:  # the variant did not apply at this level
            continue
        series.setdefault(ABLATION_LABELS.get(r["variant"], r["variant"]), []).append(
            (r["kept_params"] / 1e6, r["ppl_pydoc"]))
    for r in (compress or {}).get("peers", []):
        if r.get("mode", "inner") == "inner" and abs(r["block_fraction_removed"] - r["level"]) < 0.01:
            series.setdefault(f"torch-pruning {r['importance']}", []).append((r["params_kept"] / 1e6, r["ppl_pruned"]))
    for name, pts in sorted(series.items()):
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    if compress and isinstance(compress.get("dense"), dict) and "pydoc" in compress["dense"]:
        ax.axhline(compress["dense"]["pydoc"], color="k", ls=":", label="dense")
    ax.set_yscale("log"), ax.set_xlabel("parameters kept (M)"), ax.set_ylabel("held-out ppl right after pruning")
    ax.set_title("SmolLM2-135M, one-shot"), ax.legend(fontsize=7)
    ax = axes[1]
    for r in (pretrain or {}).get("rows", []):
        ax.scatter(r["params"] / 1e6, r["val_ppl"], label=r["variant"])
    ax.set_xlabel("parameters at the end (M)"), ax.set_ylabel("validation ppl (bytes)")
    preset = (pretrain or {}).get("conditions", {}).get("preset", "?")
    ax.set_title(f"pre-training, {preset} preset, equal steps"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    print(f"wrote {path}")


def levers_section(res: dict) -> str:
    """Issue 27: soft removal / gradual shrinking vs dense-small at equal steps and at equal
    training FLOPs (a longer dense-small run of the same seed, ``dense-small@flops-matched[-seedN]``),
    with its own figure."""
    c = res.get("conditions", {})
    rows = {r["variant"]: r for r in res.get("rows", [])}
    dense_flops = c.get("dense_train_flops")
    out = [f"**Issue 27: soft removal and gradual shrinking, on the current data split** "
           f"(`benchmarks/results/pretrain_issue27.json`; the same model, lr and {c.get('steps')} steps as above, "
           "dense-small re-run on this split; `FLOPs / dense` is against the dense model's training FLOPs "
           "counted from its shapes, the same number as the dense row above (no dense run on this split: `ppl / dense` is nan); `ppl / dense-small` is against the seed-0 row, the lines below pair the seeds; `@tag` rows name the levers, "
           "see the notes)", "", generic_table(res), ""]
    # dense-small of each seed ("dense-small" is seed 0, "dense-small@seed1" ...), FLOPs-matched of seed 0
    small = {r.get("seed", 0): r for n, r in rows.items() if n == "dense-small" or n.startswith("dense-small@seed")}
    matched = {r.get("seed", 0): r for n, r in rows.items() if n.startswith("dense-small@flops-matched")}
    by_lever: dict = {}
    for name, r in rows.items():
        s = small.get(r.get("seed", 0))
        if not name.startswith("ecospa") or not s:
            continue
        rs = r["val_ppl"] / s["val_ppl"]
        rf = r["train_flops"] / dense_flops if dense_flops else float("nan")
        m = matched.get(r.get("seed", 0))
        rm = r["val_ppl"] / m["val_ppl"] if m else None
        by_lever.setdefault(name.split("-seed")[0], []).append((rs, rf, rm))
        line = (f"{name} (seed {r.get('seed', 0)}): {rs:.3f}x dense-small at equal steps (target <= 0.98: "
                f"{'met' if rs <= 0.98 else 'MISSED'}), {rf:.3f}x dense's training FLOPs (target <= 0.80: "
                f"{'met' if rf <= 0.80 else 'MISSED'})")
        if m:
            line += (f"; {rm:.3f}x the dense-small of its seed trained for {m['train_flops'] / r['train_flops']:.3f}x "
                     f"its FLOPs ({m.get('steps', '?')} steps; target <= 1.00: {'met' if rm <= 1.0 else 'MISSED'})")
        out.append(f"- {line}.")
    for lever, got in by_lever.items():
        if len(got) > 1:
            ratios = [g[0] for g in got]
            out.append(f"- {lever}, mean of {len(got)} seeds: {sum(ratios) / len(ratios):.3f}x dense-small at equal "
                       f"steps (seeds {', '.join(f'{x:.3f}' for x in ratios)}; spread {max(ratios) - min(ratios):.3f}), "
                       f"{sum(g[1] for g in got) / len(got):.3f}x dense's FLOPs"
                       + (f"; {sum(g[2] for g in got) / len(got):.3f}x dense-small at equal FLOPs (seeds "
                          f"{', '.join(f'{g[2]:.3f}' for g in got)})" if all(g[2] for g in got) else "") + ".")
    out += [f"- {n}" for n in res.get("notes", [])]
    out += ["", "![issue 27: val ppl vs steps and vs training FLOPs](../benchmarks/results/pretrain_issue27.png)"]
    return "\n".join(out)


def pretrain_section(res: dict, search: dict = None, earlier: dict = None, levers: dict = None) -> str:
    """The pre-training section: regime, the regime search, the comparison table (with FLOPs),
    the figure and a plain verdict against the issue-14 targets."""
    c = res.get("conditions", {})
    m = c.get("model", {})
    rows = {r["variant"]: r for r in res.get("rows", [])}
    out = [f"Regime: preset `{c.get('preset')}`, {m.get('name', '?')} dim {m.get('dim')} x {m.get('n_layers')} layers "
           f"(ffn {m.get('ffn_dim')}), data `{c.get('data')}` (byte-level), batch {c.get('batch_size')} x seq "
           f"{c.get('seq_len')}, {c.get('steps')} steps = {c.get('tokens_seen', 0) / 1e6:.2f}M training tokens, lr "
           f"{c.get('lr')}, EcoSpa budget {c.get('budget')} of the coupled-group parameters; schedule "
           f"{c.get('schedule')}. Same seed, data order and LR schedule for every variant.", ""]
    if search and search.get("table"):
        out += ["Regime search (dense vs a dense model with half the block parameters, equal steps; "
                "`benchmarks/results/pretrain_search.json`):", "", generic_table({"table": search["table"]}).split("\n", 2)[2], ""]
    out += [generic_table(res), ""]
    if res.get("table_at_common_step"):
        out += [f"Equal-step comparison at step {res.get('common_step')} (the last evaluation every variant reached):",
                "", generic_table({"table": res["table_at_common_step"]}).split("\n", 2)[2], ""]
    out += ["![val ppl vs steps and vs training FLOPs](../benchmarks/results/pretrain.png)", ""]
    e, d, s = rows.get("ecospa"), rows.get("dense"), rows.get("dense-small")
    if e and d and s and None in (e["val_ppl"], d["val_ppl"], s["val_ppl"]):
        out += ["Verdict: not measured at the end of the schedule: "
                + ", ".join(f"{r['variant']} stopped at step {r.get('steps_done')}" for r in (e, d, s)
                            if r["val_ppl"] is None) + " (see the notes)."]
    elif e and d and s:
        rs, rd = e["val_ppl"] / s["val_ppl"], e["val_ppl"] / d["val_ppl"]
        rf = e["train_flops"] / d["train_flops"] if e.get("train_flops") and d.get("train_flops") else float("nan")
        gap = s["val_ppl"] / d["val_ppl"] - 1
        ok = lambda b: "met" if b else "MISSED"  # noqa: E731
        out += [f"Capacity gap: dense-small is {gap:+.1%} vs dense. EcoSpa / dense-small = {rs:.3f} "
                f"(target <= 0.98: {ok(rs <= 0.98)}), EcoSpa / dense = {rd:.3f} (target <= 1.02: {ok(rd <= 1.02)}), "
                f"EcoSpa training FLOPs / dense = {rf:.2f} (target <= 0.80: {ok(rf <= 0.80)}). "
                + ("EcoSpa beat dense-small." if rs < 1 else "EcoSpa did NOT beat dense-small.")]
    notes = res.get("notes")
    if notes:
        out += ["", *(f"- {n}" for n in notes)]
    if levers and levers.get("table"):  # issue 27's levers, on the current data split
        out += ["", levers_section(levers)]
    if earlier and earlier.get("table"):  # the same comparison at half the steps, with the levers
        c0 = earlier.get("conditions", {})
        out += ["", f"**The earlier regime: {c0.get('steps')} steps ({c0.get('tokens_seen', 0) / 1e6:.2f}M tokens), "
                    "with the schedule levers** (`benchmarks/results/pretrain_900.json`; same model, data, lr "
                    f"and seed; `ecospa` is the schedule {c0.get('schedule')}, `@tag` rows change one lever, "
                    "see the notes)", "", generic_table(earlier)]
        out += [f"- {n}" for n in earlier.get("notes", [])]
    return "\n".join(out)


def plot_pretrain(res: dict, path: str) -> None:
    """Validation ppl against steps (left) and against training FLOPs (right), every variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in res.get("rows", []):
        pts = [p for p in r.get("curve") or [] if p[1] is not None]
        if not pts:
            continue
        style = "-" if "@" not in r["variant"] else ":"
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", label=r["variant"])
        if all(p[2] for p in pts):
            axes[1].plot([p[2] / 1e12 for p in pts], [p[1] for p in pts], style, marker=".", label=r["variant"])
    c = res.get("conditions", {})
    for ax, xl in zip(axes, ("training steps", "training FLOPs (TFLOP, ecospa.train.flops)")):
        ax.set_xlabel(xl), ax.set_ylabel("validation ppl (bytes)"), ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"pre-training, preset {c.get('preset')} on {c.get('data')}, {c.get('steps')} steps")
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    print(f"wrote {path}")


def generate_table(res: dict) -> str:
    c = res["conditions"]
    rows = [f"Conditions: {c.get('model')}, prompt {c.get('prompt')} + {c.get('new_tokens')} new tokens, "
            f"greedy, device={c.get('device')}, dtype={c.get('dtype')}, torch={c.get('torch')}, "
            f"threads={c.get('torch_threads')}, transformers={c.get('transformers')}, reps={c.get('reps')}, "
            f"{c.get('time')}", "",
            "| batch | variant | tokens/s | ms per step | speedup vs ecospa dense | ideal (weight bytes) | of ideal |",
            "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        extra = " (same tokens)" if r.get("same_tokens_as_ecospa") else ""
        rows.append(f"| {r['batch']} | {r['variant']}{extra} | {r['tokens_per_s']:,.1f} | "
                    f"{r['ms_per_token_step']:.1f} | {r['speedup_vs_ecospa_dense']:.2f}x | "
                    f"{r['ideal_speedup']:.2f}x | {r['fraction_of_ideal']:.2f} |")
    return "\n".join(rows) + "\n"


def export_table(res: dict) -> str:
    rows = [f"SmolLM2-135M, {res['conditions']['budget']:.0%} budget: {res['dense_params']:,} -> "
            f"{res['pruned_params']:,} params; greedy {res['conditions']['new_tokens']} tokens after a "
            f"{res['conditions']['prompt_tokens']}-token held-out prompt.", "",
            "| format | loaded by | params in the runtime | max abs logit diff (scale) | greedy tokens == ecospa |",
            "|---|---|---|---|---|"]
    for fmt, r in res["formats"].items():
        rows.append(f"| {fmt} | {r['loader']} | {r['params']:,} | {r['max_abs_logit_diff']:.1e} "
                    f"({r['logit_scale']:.0f}) | {r['greedy_tokens_agreeing']}/{res['conditions']['new_tokens']} |")
    return "\n".join(rows) + "\n"


def obs_refit_table(res: dict) -> str:
    """benchmarks/obs_refit.py: the two paths' medians and ratio, and whether they agree."""
    c = res["conditions"]
    return (generic_table(res) + f"\n\nShape {c['shape']}, {c['batches']} refit batches of {c['rows']} x {c['seq']} "
            f"tokens, {c['reps']} alternating repetitions, load average {c['load_avg_start']:.2f} -> "
            f"{c['load_avg_end']:.2f}; largest difference between the two refit models: {res['max_abs_diff']:.3g}.")


def recovery_dtype_table(res: dict) -> str:
    """benchmarks/recovery_dtype.py: a recovery step's median in each dtype, the ratio, the CPU."""
    c = res["conditions"]
    bf16 = {True: "with bfloat16 matmuls (AVX512-BF16/AMX)", False: "WITHOUT bfloat16 matmuls",
            None: "bfloat16 support unknown"}[c.get("cpu_bf16")]
    return (generic_table(res) + f"\n\nShape {c['shape']}, {c['rows']} x {c['seq']} tokens, {c['reps']} "
            f"alternating steps of each after a warm-up, {c.get('torch_threads')} threads, CPU "
            f"{c.get('cpu_capability')} {bf16}, load average {c['load_avg_start']:.2f} -> {c['load_avg_end']:.2f}.")


def replace_section(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pat.search(text):
        print(f"no section 'results:{name}' in the file; skipped", file=sys.stderr)
        return text
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Reads benchmarks/results/*.json "
                            "(never the *_quick.json of smoke runs); rewrites only the marked sections "
                            "of docs/BENCHMARKS.md and README.md and the PNGs in benchmarks/results."
                            ).parse_args(argv)
    readme = os.path.join(ROOT, "docs", "BENCHMARKS.md")
    text = open(readme).read()
    for fname, section in [("speed_cpu.json", "speed-cpu"), ("speed_cuda.json", "speed-cuda")]:
        res = _load(fname)
        if res:
            body = speed_table(res)
            aligned = _load(fname.replace(".json", "_aligned.json"))
            if aligned:  # the same benchmark with kernel-friendly kept widths (--multiple-of)
                body += ("\n\n**With aligned widths** (`python benchmarks/speed.py --multiple-of "
                         f"{aligned['conditions'].get('multiple_of')}`, results/{fname.replace('.json', '_aligned.json')}): "
                         "every group keeps a width (blocks x units) that is a multiple of it, e.g. the "
                         "MLP of llama-60m at kept 0.40 keeps 552 neurons instead of 550.\n\n"
                         + speed_table(aligned, brief=True))
            text = replace_section(text, section, body)
            plot_speed(res, os.path.join(RESULTS, fname.replace(".json", ".png")))
    res = _load("pretrain.json")
    if res and res.get("table"):
        levers = _load("pretrain_issue27.json")
        text = replace_section(text, "pretrain", pretrain_section(res, _load("pretrain_search.json"),
                                                                  _load("pretrain_900.json"), levers))
        plot_pretrain(res, os.path.join(RESULTS, "pretrain.png"))
        if levers and levers.get("rows"):
            plot_pretrain(levers, os.path.join(RESULTS, "pretrain_issue27.png"))
    res = _load("compress.json")
    if res and (res.get("recovery") or res.get("ablation")):
        text = replace_section(text, "compress", compress_section(res))
    dedup = _load("compress_dedup.json")
    if res and dedup and dedup.get("complete"):
        text = replace_section(text, "split", split_section(res, dedup))
    for fname, section, fn in [("generate.json", "generate", generate_table),
                               ("export_smollm2.json", "export", export_table),
                               ("compress_levers28.json", "levers28", levers28_section),
                               ("obs_refit.json", "obs-refit", obs_refit_table),
                               ("recovery_dtype.json", "recovery-dtype", recovery_dtype_table)]:
        got = _load(fname)
        if got:
            text = replace_section(text, section, fn(got))
    if res or _load("pretrain.json"):
        plot_quality(res, _load("pretrain.json"),
                     os.path.join(RESULTS, "quality.png"))
    _write(readme, text)
    front = os.path.join(ROOT, "README.md")
    summary = summary_lines(_load("speed_cpu.json"), _load("pretrain.json"), res, dedup,
                            _load("generate.json"), _load("export_smollm2.json"), _load("pretrain_issue27.json"),
                            _load("compress_levers28.json"))
    _write(front, replace_section(open(front).read(), "summary", summary))


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    print(f"updated {path}")


if __name__ == "__main__":
    main()
