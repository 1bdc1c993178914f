#!/usr/bin/env python3
"""A header fix: xsbuild's capture against compiling the affected translation units once.

A change to a header recompiles every object that includes it.  The least any tool can do is
compile each of them once, patched; xsbuild compiles the patched versions, then the original
only of the objects whose bytes changed (proving the replay there), plus ``-g`` twins (at
``-O0``) of the fewest changed objects that show every touched file's types, for the layout
check.  Goal: capture at most 1.2x the baseline.

* baseline: the affected objects' own ``.o.cmd`` lines, run once each on a patched copy of the
  tree, ``-j N`` (gcc + the objcopy step; the copy is made before timing starts);
* candidate: :func:`xsbuild.capture.capture` with the layout twins, as ``xsbuild build`` runs it.

Both run in the same invocation, alternately, ``--repeat`` times; the ratio of the best times is
reported (the machine is noisy).

    python3 bench/header_fix.py [--tree TOP] [--patch P] [-j N] [--repeat 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debian_tree import default_top

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATCH = REPO / "tests/xen/patches/11-header-inline.patch"


def affected(top: Path, patch: Path) -> list[object]:
    from xsbuild.capture import TreeIndex, parse_patch_files

    index = TreeIndex.load(top / "xen")
    objs: dict[str, object] = {}
    for t in parse_patch_files(patch.read_text(), patch.name):
        for o in index.affected(t.path.removeprefix("xen/")):
            if o.final in index.linked:
                objs[o.obj] = o
    return list(objs.values())


def baseline(top: Path, patch: Path, jobs: int) -> tuple[float, int]:
    """Compile every affected object once, patched, with its own recorded line."""
    from xsbuild.capture import TreeIndex, compile_many

    with tempfile.TemporaryDirectory(prefix="xsb-hdr-base-") as tmp:
        copy = Path(tmp) / "tree"
        shutil.copytree(top, copy, symlinks=True)
        subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=copy, check=True)
        index = TreeIndex.load(top / "xen")
        objs = affected(top, patch)
        start = time.monotonic()
        done = compile_many(objs, cwd=copy / "xen", out_dir=Path(tmp) / "out", jobs=jobs,  # type: ignore[arg-type]
                            new_top=copy, recorded_top=index.recorded_top)
        seconds = time.monotonic() - start
    failed = [c.obj for c in done if c.error]
    if failed:
        raise SystemExit(f"baseline compile failed: {failed[:3]}")
    return seconds, len(objs)


def candidate(top: Path, patch: Path, jobs: int) -> tuple[float, int, int]:
    from xsbuild.capture import CaptureRequest, capture

    with tempfile.TemporaryDirectory(prefix="xsb-hdr-cap-") as tmp:
        req = CaptureRequest(top, (patch,), Path(tmp) / "w", jobs=jobs, debug_info=True)
        start = time.monotonic()
        result = capture(req, on_debug_pairs=lambda _pairs: None)
        seconds = time.monotonic() - start
    return seconds, len(result.changed), len(result.unchanged)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=default_top())
    ap.add_argument("--patch", type=Path, default=DEFAULT_PATCH)
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    args.patch = args.patch.resolve()  # patch(1) runs in the tree's copy
    base_times, cand_times = [], []
    for _ in range(args.repeat):
        secs, n = baseline(args.tree, args.patch, args.jobs)
        base_times.append(secs)
        secs, changed, unchanged = candidate(args.tree, args.patch, args.jobs)
        cand_times.append(secs)
    ratio = min(cand_times) / min(base_times)
    print(f"header fix {args.patch.name}: {n} affected objects, {changed} changed, "
          f"{unchanged} unchanged (-j{args.jobs}, best of {args.repeat})")
    print("| what | seconds (best) | vs baseline |\n|---|---|---|")
    print(f"| compile the affected objects once (baseline) | {min(base_times):.1f} | 1.00x |")
    print(f"| xsbuild capture (patched, changed originals, -g twins) | {min(cand_times):.1f} | "
          f"{ratio:.2f}x |")
    print(f"goal: at most 1.2x: {'met' if ratio <= 1.2 else 'NOT met'}")
    return 0 if ratio <= 1.2 else 1


if __name__ == "__main__":
    sys.exit(main())
