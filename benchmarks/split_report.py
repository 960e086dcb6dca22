"""The compression numbers before and after the train/val split was deduplicated (issue 23).

Until then 14 of the 139 pydoc VAL paragraphs (8.7% of the val text) were also in pydoc TRAIN
(the ``compound`` topic quotes the ``if``/``for``/``else`` topics), and ``--data stdlib`` trained on
``pydoc_data/topics.py``. ``results/compress.json`` was measured on the old split;
``results/compress_dedup.json`` re-measures dense, ``obs+refit`` right after pruning and the job's
defaults after 80 steps on the deduplicated split, with the same command otherwise.
"""
from __future__ import annotations


def _fmt(x) -> str:
    return "–" if x is None else f"{x:.2f}"


def _moved(old, new) -> str:
    if old is None or new is None:
        return f"{_fmt(old)} → {_fmt(new)}"
    return f"{old:.2f} → {new:.2f} ({(new / old - 1) * 100:+.1f}%)"


def _rows(res: dict) -> dict:
    """{(what, level): {"pydoc", "stdlib"}} of the rows both files can share."""
    out = {("dense", 0.0): {"pydoc": res["dense"]["pydoc"], "stdlib": res["dense"]["stdlib"]}}
    for r in res.get("ablation", []):
        out[(f"{r['variant']}, no training", r["level"])] = {"pydoc": r["ppl_pydoc"], "stdlib": r["ppl_stdlib"]}
    for r in res.get("recovery", []):
        if r.get("variant") == "job-default":
            out[(f"job defaults, after refit", r["level"])] = {"pydoc": r.get("ppl_reconstructed"), "stdlib": None}
            out[(f"job defaults, after {r['steps']} steps", r["level"])] = {"pydoc": r["ppl_recovered"],
                                                                            "stdlib": r.get("ppl_stdlib")}
    return out


def split_section(old: dict, new: dict) -> str:
    """Markdown: each row measured on both splits, old → new, both held-out texts."""
    a, b = _rows(old), _rows(new)
    lines = ["| removed | row | pydoc val: old split → deduplicated | stdlib val: old → deduplicated |",
             "|---|---|---|---|"]
    for key in sorted(set(a) & set(b), key=lambda k: (k[1], k[0] != "dense", k[0])):
        what, level = key
        lines.append(f"| {level:.0%} | {what} | {_moved(a[key]['pydoc'], b[key]['pydoc'])} | "
                     f"{_moved(a[key]['stdlib'], b[key]['stdlib'])} |")
    c = new.get("conditions", {})
    lines += ["", f"Re-measured with `{c.get('command', '?')}` (results/compress_dedup.json; "
              f"{c.get('eval', {}).get('pydoc', '')}). Every other compression number in this file "
              "was measured on the old split."]
    return "\n".join(lines) + "\n"


__all__ = ["split_section"]
