"""The base install runs the main job: every third-party module that ``ecospa train`` (and the
checkpoint writer/reader) imports at run time is a declared base dependency or one of theirs.

Regression: safetensors imports numpy inside ``save_file`` but declares it only as an extra, and
torch does not depend on it; a base install died after two minutes of training when the first
checkpoint was written. The test runs a short training job in a fresh interpreter, records every
imported top-level module, and checks each one's distribution against the closure of ecospa's
base requirements (extras excluded) as the installed metadata declares them.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, sys
    from ecospa import cli
    rc = cli.main(["train", "--steps", "40", "--eval-every", "20", "--ckpt-every", "20",
                   "--out", sys.argv[1], "--no-progress"])
    from ecospa.io import checkpoint
    checkpoint.load(sys.argv[1] + "/checkpoint")
    print(json.dumps({"rc": rc, "modules": sorted({m.split(".")[0] for m in sys.modules})}))
""")


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _base_closure(dist: str) -> set[str]:
    """``dist`` and everything its non-extra requirements pull in, recursively (markers evaluated)."""
    from packaging.requirements import Requirement
    seen, todo = set(), [dist]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra, or not for this platform
            todo.append(_name(req.name))
    return seen


@pytest.mark.slow
def test_main_job_imports_only_base_dependencies(tmp_path):
    pytest.importorskip("packaging")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rc"] == 0
    stdlib = set(sys.stdlib_module_names) | set(sys.builtin_module_names)
    owners = md.packages_distributions()
    closure = _base_closure("ecospa")
    missing = {}
    for module in report["modules"]:
        if module in stdlib or module.startswith("_") or module == "ecospa":
            continue
        dists = {_name(d) for d in owners.get(module, [])}
        if dists and not dists & closure:
            missing[module] = sorted(dists)
    assert not missing, (f"the main job imports {missing}, which a base install of ecospa does not "
                         "bring: declare them in [project] dependencies")
