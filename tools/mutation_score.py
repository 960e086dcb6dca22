"""Mutation score from mutmut 3's result files (run in the directory that holds ``mutants/``).

    python tools/mutation_score.py [--equivalents tools/mutation_equivalents.md] [PATTERN ...]

Counts every checked mutant per module (PATTERNs, fnmatch on mutant names, restrict the count to
those mutants, e.g. 'ecospa.train.x_make_step__mutmut_*'). Mutants listed in the equivalents file
(their names in backticks) cannot change behaviour and are left out of the score. A timeout counts
as killed (the mutant hung the tests). Score = killed / (checked - equivalent).
Prints the survivors that are not listed as equivalent; exits 1 if any checked mutant is neither.
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import re
import sys
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          35: "suspicious", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout",
          37: "caught by type check", -11: "segfault", -9: "segfault", 2: "interrupted", None: "not checked"}
DETECTED = {"killed", "timeout", "caught by type check", "segfault"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--equivalents", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("patterns", nargs="*")
    args = ap.parse_args(argv)
    equivalent = set()
    if args.equivalents and args.equivalents.is_file():
        equivalent = set(re.findall(r"`(ecospa\.[\w.ǁ]+__mutmut_\d+)`", args.equivalents.read_text("utf-8")))
    per_module: dict = collections.defaultdict(collections.Counter)
    left = []
    for meta in sorted(Path("mutants").rglob("*.meta")):
        results = json.loads(meta.read_text("utf-8"))["exit_code_by_key"]
        module = str(meta.relative_to("mutants"))[: -len(".meta")]
        for name, code in sorted(results.items()):
            if args.patterns and not any(fnmatch.fnmatchcase(name, p) for p in args.patterns):
                continue
            status = STATUS.get(code, "suspicious")
            if status in ("not checked", "skipped"):
                per_module[module]["not checked"] += 1
                continue
            if status not in DETECTED and name in equivalent:
                status = "equivalent"
            per_module[module][status] += 1
            if status not in DETECTED and status != "equivalent":
                left.append(f"{name}: {status}")
    total = collections.Counter()
    print(f"{'module':28} {'killed':>7} {'equiv':>6} {'left':>5} {'score':>7}   (not checked)")
    for module, c in sorted(per_module.items()):
        total.update(c)
        _line(module, c)
    _line("TOTAL", total)
    if args.json:
        args.json.write_text(json.dumps({m: dict(c) for m, c in {**per_module, "TOTAL": total}.items()}, indent=1))
    if left:
        print(f"\n{len(left)} mutants neither killed nor listed as equivalent:")
        print("\n".join("  " + x for x in left))
    return 1 if left else 0


def _line(module: str, c: collections.Counter) -> None:
    killed = sum(c[s] for s in DETECTED)
    scored = sum(v for k, v in c.items() if k not in ("equivalent", "not checked"))
    left = scored - killed
    score = f"{100 * killed / scored:6.1f}%" if scored else "    n/a"
    print(f"{module:28} {killed:7d} {c['equivalent']:6d} {left:5d} {score}   ({c['not checked']})")


if __name__ == "__main__":
    sys.exit(main())
