#!/usr/bin/env python3
"""The tree-wide self-diff through xsbuild's own parallel path, this checkout against a baseline.

Every C object linked into ``xen-syms`` is diffed against a byte-identical copy by
``xsbuild.build._diff_all`` (the pool ``xsbuild build`` uses) with ``-j`` workers (default 2),
and ``xsbuild diff OBJ OBJ`` is started for one small object (start-up cost as a user pays it,
best of ``--repeat``).  Both run twice in the same invocation: with the code of the baseline
commit (``git archive``, default the commit before the issue-11 redesign) and with this checkout,
each in a fresh interpreter; the table shows seconds and the ratio candidate / baseline.

    python3 bench/selfdiff_parallel.py [--tree XEN_TOP] [-j 2] [--base 76bbfd1] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debian_tree import default_top

REPO = Path(__file__).resolve().parents[1]


def child(jobs: int) -> None:
    """In a fresh interpreter: copy the objects, then time the self-diff of all of them."""
    from xsbuild.build import BuildLog, _diff_all
    from xsbuild.capture import CapturedObject
    from xsbuild.errors import NoChangeError

    spec = json.loads(sys.stdin.read())
    with tempfile.TemporaryDirectory(prefix="xsb-bench-") as tmp:
        pairs = []
        for i, (obj, path) in enumerate(spec["objects"]):
            copy = Path(tmp) / "copies" / f"{i}.o"
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(path, copy)
            pairs.append(CapturedObject(obj, Path(path), copy))
        start = time.monotonic()
        try:
            diffs, _outputs = _diff_all(pairs, Path(tmp) / "out", jobs, BuildLog(lambda _l: None),
                                        ())
            status = f"{len(diffs)} changed"
        except NoChangeError:
            status = "no-change"
        print(json.dumps({"wall": time.monotonic() - start, "status": status}))


def run_child(code: Path, objects: list[tuple[str, str]], jobs: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{REPO / 'bench'}"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(jobs)], env=env,
                          input=json.dumps({"objects": objects}), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child ({code}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def startup(code: Path, obj: Path, repeat: int) -> float:
    """Best wall time of ``python -m xsbuild diff OBJ OBJ`` (exit 3, nothing written)."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    best = float("inf")
    for _ in range(repeat):
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "xsbuild", "diff", str(obj), str(obj)],
                              env=env, capture_output=True, check=False)
        best = min(best, time.monotonic() - start)
        if proc.returncode != 3:
            raise SystemExit(f"xsbuild diff {obj} {obj}: exit {proc.returncode}")
    return best


def tree_objects(top: Path) -> list[tuple[str, str]]:
    from xsbuild.capture import TreeIndex

    index = TreeIndex.load(top / "xen")
    finals = sorted({o.final for o in index.objects.values()
                     if o.final in index.linked and not o.is_asm})
    return [(f, str(top / "xen" / f)) for f in finals]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=default_top(), help="top of a built Xen tree")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--base", default="76bbfd1", help="baseline commit")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return 0
    objects = tree_objects(args.tree)
    small = min((Path(p) for _o, p in objects), key=lambda p: p.stat().st_size)
    with tempfile.TemporaryDirectory(prefix="xsb-base-") as tmp:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", args.base],
                                 capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        rows = {}
        for label, code in ((f"base {args.base}", Path(tmp)), ("this checkout", REPO)):
            run = run_child(code, objects, args.jobs)
            rows[label] = (run["wall"], run["status"], startup(code, small, args.repeat))
    print(f"self-diff of {len(objects)} C objects of {args.tree}, -j{args.jobs} through "
          f"xsbuild.build._diff_all; start-up: xsbuild diff {small.name} (best of {args.repeat})")
    print(f"{'code':<16} {'self-diff s':>12} {'ratio':>6} {'start-up ms':>12} {'ratio':>6}  status")
    base_wall, _s, base_start = next(iter(rows.values()))
    for label, (wall, status, start) in rows.items():
        print(f"{label:<16} {wall:>12.2f} {wall / base_wall:>6.2f} {start * 1000:>12.0f} "
              f"{start / base_start:>6.2f}  {status}")
    return 0 if all(r[1] == "no-change" for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
