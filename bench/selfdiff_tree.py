#!/usr/bin/env python3
"""Self-diff every object of a built Xen tree: each must report "no change".

For every object linked into ``xen-syms`` (the closure of ``prelink.o``, as ``xsbuild build``
sees it) the differ compares the object with a byte-identical copy of itself.  Any status other
than no-change, and any error, is a differ bug on real input; the script prints each one and
exits 1.  Serial and parallel runs happen in the same invocation, each in its own child process
so its peak memory (max RSS) is measured on its own.

    python3 bench/selfdiff_tree.py [--tree XEN_TOP] [-j N] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from debian_tree import default_top

DEFAULT_TREE = default_top()


def tree_objects(top: Path) -> tuple[list[Path], int]:
    """The C objects linked into xen-syms, and how many assembly objects were left out (the
    differ needs gcc's FILE symbol; ``xsbuild build`` refuses assembly changes anyway)."""
    from xsbuild.capture import TreeIndex

    index = TreeIndex.load(top / "xen")
    linked = [o for o in index.objects.values() if o.final in index.linked]
    finals = sorted({o.final for o in linked if not o.is_asm})
    return [top / "xen" / f for f in finals], sum(1 for o in linked if o.is_asm)


def self_diff(obj: str) -> tuple[str, str, str]:
    """(object, status, detail): diff ``obj`` against a copy of itself."""
    from xsbuild.diff import diff_files
    from xsbuild.errors import XsbuildError

    with tempfile.TemporaryDirectory(prefix="xsb-selfdiff-") as tmp:
        copy = Path(tmp) / Path(obj).name
        shutil.copyfile(obj, copy)
        try:
            result = diff_files(obj, copy, Path(tmp) / "out.o")
        except XsbuildError as exc:
            return obj, "error", f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bench reports every crash, then goes on
            return obj, "crash", f"{type(exc).__name__}: {exc}"
        detail = "" if result.status == "no-change" else json.dumps(result.to_json())[:300]
        return obj, result.status, detail


def run_mode(objs: list[str], jobs: int) -> dict[str, object]:
    """Child process body: diff everything, report counts, failures and wall time."""
    start = time.monotonic()
    if jobs <= 1:
        results = [self_diff(o) for o in objs]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(self_diff, objs, chunksize=4))
    wall = time.monotonic() - start
    bad = [r for r in results if r[1] != "no-change"]
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"jobs": jobs, "objects": len(results), "no_change": len(results) - len(bad),
            "bad": bad, "wall": wall, "peak_rss_kb": max(own, kids)}


def measure(objs: list[Path], jobs: int) -> dict[str, object]:
    """Run one mode in a fresh interpreter, so RSS figures are not polluted by the other."""
    proc = subprocess.run([sys.executable, __file__, "--child", str(jobs)],
                          input=json.dumps([str(o) for o in objs]), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child (-j{jobs}) failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=DEFAULT_TREE, help="top of a built Xen tree")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N objects (smoke run)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(run_mode(json.loads(sys.stdin.read()), args.child)))
        return 0
    objs, asm = tree_objects(args.tree)
    if args.limit:
        objs = objs[: args.limit]
    rows = [measure(objs, 1), measure(objs, args.jobs)]
    print(f"self-diff of {len(objs)} C objects of {args.tree} ({asm} assembly objects skipped)")
    print(f"{'mode':<10} {'objects':>8} {'no-change':>10} {'wall s':>8} {'obj/s':>7} "
          f"{'peak RSS MB':>12}")
    for r in rows:
        mode = "serial" if r["jobs"] == 1 else f"-j{r['jobs']}"
        print(f"{mode:<10} {r['objects']:>8} {r['no_change']:>10} {r['wall']:>8.2f} "
              f"{r['objects'] / r['wall']:>7.1f} {r['peak_rss_kb'] / 1024:>12.1f}")
    print(f"speed-up -j{args.jobs} over serial: {rows[0]['wall'] / rows[1]['wall']:.2f}x "
          "(peak RSS of the parallel run is per process: the largest worker)")
    bad = rows[0]["bad"]
    for obj, status, detail in bad:  # type: ignore[misc]
        print(f"NOT no-change: {obj}: {status} {detail}")
    return 1 if bad or rows[1]["bad"] else 0


if __name__ == "__main__":
    sys.exit(main())
