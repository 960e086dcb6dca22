"""Regenerate the README's result tables (and the plots) from benchmarks/results/*.json.

    python benchmarks/report.py            # rewrites the marked sections of README.md, writes PNGs

Each table sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md;
only those sections change. A results file that is missing leaves its section as it is.
"""
from __future__ import annotations

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from speed_report import plot_speed, speed_table  # noqa: E402  (the speed sections)
LABELS = {"ecospa": "ecospa: coupled Fisher, global budget", "uniform": "ecospa: coupled Fisher, same fraction per group",
          "magnitude": "ecospa: one-side magnitude, global budget",
          "ecospa-distill": "ecospa: coupled Fisher, global budget, recovery distilled from dense",
          "ecospa-distill-2rounds": "ecospa: as above, 2 prune-and-recover rounds"}


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


def compress_table(res: dict) -> str:
    """ecospa variants and peers at each removal level; ratios against Torch-Pruning's best."""
    rows = []
    for r in res.get("runs", []):
        label = LABELS.get(r["variant"], f"ecospa: {r['variant']}")
        pruned = r["ppl_pruned"]
        if len(r.get("rounds") or []) > 1:  # iterative: the last prune comes after earlier recovery
            pruned = r["rounds"][-1]["ppl_pruned"]
            label += f" (ppl after pruning: last of {len(r['rounds'])} rounds)"
        rows.append((r["level"], label, r["kept_params"], pruned, r.get("ppl_recovered"), r["steps"]))
    for r in res.get("peers", []):
        name = f"{r['tool']} {r['importance']}" + ("" if r.get("mode", "inner") == "inner" else f" ({r['mode']})")
        if abs(r.get("block_fraction_removed", r["level"]) - r["level"]) > 0.01:
            name += f" (removed only {r['block_fraction_removed']:.1%}: head pruning skipped)"
        if r.get("ppl_recovered") is not None or not r.get("ppl_at_steps"):
            rows.append((r["level"], name, r["params_kept"], r["ppl_pruned"], r.get("ppl_recovered"),
                         r["steps"] if r.get("ppl_recovered") is not None else 0))
        for steps, ppl in (r.get("ppl_at_steps") or {}).items():  # intermediate evaluations
            if int(steps) != r["steps"]:
                rows.append((r["level"], name, r["params_kept"], r["ppl_pruned"], ppl, int(steps)))
    rows = list(dict.fromkeys(rows))
    best = {}
    for level, name, _, pp, pr, steps in rows:
        if name.startswith("torch-pruning"):
            best[(level, "pruned")] = min(best.get((level, "pruned"), float("inf")), pp)
            if pr is not None:
                key = (level, "recovered", steps)
                best[key] = min(best.get(key, float("inf")), pr)
    dense = res.get("dense", {}).get("ppl")
    out = [f"Dense perplexity: {dense:.3f}." if dense else "",
           "", "| removed | method | params kept | ppl after pruning | ÷ TP best | ppl after recovery (steps) | ÷ TP best |",
           "|---|---|---|---|---|---|---|"]
    for level, name, kept, pp, pr, steps in sorted(rows, key=lambda r: (r[0], r[1])):
        bp = best.get((level, "pruned"))
        br = best.get((level, "recovered", steps))
        rec = f"{pr:.2f} ({steps})" if pr is not None and steps else "—"
        out.append(f"| {level:.0%} of block params | {name} | {kept / 1e6:.1f}M | {pp:.2f} | "
                   f"{pp / bp:.3f} | {rec} | " + (f"{pr / br:.3f}" if br and pr is not None and steps else "—") + " |"
                   if bp else
                   f"| {level:.0%} of block params | {name} | {kept / 1e6:.1f}M | {pp:.2f} | — | {rec} | — |")
    c = res.get("conditions", {})
    out += ["", f"Evaluation: {c.get('eval', '?')}. Calibration: {c.get('calibration', '?')}. "
                f"Recovery: {c.get('recovery', '?')}. TP = Torch-Pruning (DepGraph), best of its criteria at the same level."]
    return "\n".join(out)


def plot_quality(compress: dict, pretrain: dict, path: str) -> None:
    """Perplexity vs kept parameters: SmolLM2 compression (left) and tiny pre-training (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    series = {}
    for r in (compress or {}).get("runs", []):
        if r["steps"] == 0:
            series.setdefault(LABELS.get(r["variant"], r["variant"]), []).append((r["kept_params"] / 1e6, r["ppl_pruned"]))
    for r in (compress or {}).get("peers", []):
        if r.get("mode", "inner") == "inner" and abs(r["block_fraction_removed"] - r["level"]) < 0.01:
            series.setdefault(f"torch-pruning {r['importance']}", []).append((r["params_kept"] / 1e6, r["ppl_pruned"]))
    for name, pts in sorted(series.items()):
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=name)
    if compress and compress.get("dense"):
        ax.axhline(compress["dense"]["ppl"], color="k", ls=":", label="dense")
    ax.set_yscale("log"), ax.set_xlabel("parameters kept (M)"), ax.set_ylabel("held-out ppl right after pruning")
    ax.set_title("SmolLM2-135M, one-shot"), ax.legend(fontsize=7)
    ax = axes[1]
    for r in (pretrain or {}).get("rows", []):
        ax.scatter(r["params"] / 1e6, r["val_ppl"], label=r["variant"])
    ax.set_xlabel("parameters at the end (M)"), ax.set_ylabel("validation ppl (bytes)")
    ax.set_title("pre-training, tiny preset, equal steps"), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    print(f"wrote {path}")


def pretrain_section(res: dict, search: dict = None) -> str:
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
    out += [generic_table(res), "", "![val ppl vs steps and vs training FLOPs](benchmarks/results/pretrain.png)", ""]
    e, d, s = rows.get("ecospa"), rows.get("dense"), rows.get("dense-small")
    if e and d and s:
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


def replace_section(text: str, name: str, body: str) -> str:
    pat = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
    if not pat.search(text):
        print(f"README has no section 'results:{name}'; skipped", file=sys.stderr)
        return text
    return pat.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text)


def main() -> None:
    readme = os.path.join(ROOT, "README.md")
    text = open(readme).read()
    for fname, section in [("speed_cpu.json", "speed-cpu"), ("speed_cuda.json", "speed-cuda")]:
        res = _load(fname)
        if res:
            text = replace_section(text, section, speed_table(res))
            plot_speed(res, os.path.join(RESULTS, fname.replace(".json", ".png")))
    res = _load("pretrain.json")
    if res and res.get("table"):
        text = replace_section(text, "pretrain", pretrain_section(res, _load("pretrain_search.json")))
        plot_pretrain(res, os.path.join(RESULTS, "pretrain.png"))
    res = _load("compress.json")
    if res and (res.get("runs") or res.get("peers")):
        text = replace_section(text, "compress", compress_table(res))
    for fname, section, fn in [("generate.json", "generate", generate_table),
                               ("export_smollm2.json", "export", export_table)]:
        got = _load(fname)
        if got:
            text = replace_section(text, section, fn(got))
    if res or _load("pretrain.json"):
        plot_quality(res, _load("pretrain.json"), os.path.join(RESULTS, "quality.png"))
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
