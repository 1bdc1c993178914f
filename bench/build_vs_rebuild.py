#!/usr/bin/env python3
"""Per-payload build time on a warm base versus rebuilding the hypervisor, same patch, same run.

Candidate: ``xsbuild build`` against the built tree (the base is warm: it is never rebuilt),
best of ``--repeat`` runs.
Baselines, on a scratch copy of the tree with the patch applied (the copy is not timed):
  * ``make incremental``: what a make-based tool pays per build after the patch (make rebuilds the
    changed objects and relinks xen-syms/xen.efi); the peer tool does this twice per payload,
    after one full build;
  * ``make full``: ``make clean`` then a full build, as the peer tool's first step does.

    python3 bench/build_vs_rebuild.py [--tree TOP] [--xen-syms F] [--patch P] [-j N] [--no-full]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debian_tree import default_top, default_xen_syms

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TREE = default_top()
DEFAULT_SYMS = default_xen_syms()
DEFAULT_PATCH = REPO / "tests/xen/patches/01-changed-function.patch"


def timed(argv: list[str], **kw: object) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:4])}... failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - start


def xsbuild_build(args: argparse.Namespace, out: Path) -> float:
    return timed([sys.executable, "-m", "xsbuild", "build", "--srcdir", str(args.tree),
                  "--patch", str(args.patch), "--xen-syms", str(args.xen_syms), "-o", str(out),
                  "-j", str(args.jobs)])


def make_times(args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """Copy the tree (untimed), apply the patch, time make; the copy is built in place."""
    from xsbuild.debian import make_recipe

    copy = scratch / args.tree.name
    print(f"copying {args.tree} to {copy} (not timed)...", file=sys.stderr)
    shutil.copytree(args.tree, copy, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    subprocess.run(["patch", "-p1", "-s", "--fuzz=0", "-i", str(args.patch)], cwd=copy,
                   check=True)
    recipe = make_recipe(copy)
    # The copy's objects were compiled with the original path in their prefix maps; make would
    # see a changed command line and rebuild everything, so build with the original path's
    # variables (what a user re-running make in their own tree pays).
    make_args = [a.replace(str(copy), str(args.tree)) for a in recipe.args]
    make = ["make", "-C", "xen", *make_args, f"-j{args.jobs}"]
    times = {"make incremental (patched tree)": timed(make, cwd=copy, env=recipe.env)}
    if args.full:
        timed(["make", "-C", "xen", *make_args, "clean"], cwd=copy, env=recipe.env)
        times["make full rebuild (after clean)"] = timed(make, cwd=copy, env=recipe.env)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=DEFAULT_TREE)
    ap.add_argument("--xen-syms", type=Path, default=DEFAULT_SYMS)
    ap.add_argument("--patch", type=Path, default=DEFAULT_PATCH)
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-full", dest="full", action="store_false",
                    help="skip the full rebuild baseline (about 100 s on 2 cores)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xsb-bench-") as tmp:
        scratch = Path(tmp)
        runs = [xsbuild_build(args, scratch / f"p{i}.livepatch") for i in range(args.repeat)]
        rows = {"xsbuild build (warm base), best": min(runs),
                "xsbuild build (warm base), worst": max(runs)}
        rows.update(make_times(args, scratch))
    best = rows["xsbuild build (warm base), best"]
    print(f"patch {args.patch.name}, tree {args.tree}, -j{args.jobs}")
    print(f"{'what':<36} {'seconds':>9} {'vs xsbuild':>11}")
    for what, secs in rows.items():
        print(f"{what:<36} {secs:>9.2f} {secs / best:>10.1f}x")
    peer = 2 * rows["make incremental (patched tree)"]
    print(f"{'peer per payload (2 incremental)':<36} {peer:>9.2f} {peer / best:>10.1f}x"
          "  (plus one full build per payload)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
