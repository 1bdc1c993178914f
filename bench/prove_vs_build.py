#!/usr/bin/env python3
"""``xsbuild prove`` versus ``xsbuild build`` of the same payload, same patches, same run.

Baseline: ``xsbuild build`` of each patch against the built tree (best of ``--repeat``).
Candidate: ``xsbuild prove`` of that payload, split into its parts as the proof reports them:
the incremental ``make`` of the patched hypervisor in the private copy (the part a make-based
tool pays anyway) and the comparison itself (reading both hypervisors, normalising, comparing).
The private copy is made (and checked to reproduce the base) before timing starts.

    python3 bench/prove_vs_build.py [--tree TOP] [--xen-syms F] [--patch P ...] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from debian_tree import default_top, default_xen_syms

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PATCHES = [REPO / "tests/xen/patches" / name for name in (
    "01-changed-function.patch", "07-extable.patch", "11-header-inline.patch")]


def run(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    return time.monotonic() - start, proc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=default_top())
    ap.add_argument("--xen-syms", type=Path, default=default_xen_syms())
    ap.add_argument("--patch", type=Path, action="append")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    xsb = [sys.executable, "-m", "xsbuild"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="xsbuild-bench-prove-") as tmp:
        for patch in args.patch or DEFAULT_PATCHES:
            out = Path(tmp) / (patch.stem + ".livepatch")
            builds, proofs = [], []
            for _ in range(args.repeat):
                secs, proc = run([*xsb, "build", "--srcdir", str(args.tree), "--patch",
                                  str(patch), "--xen-syms", str(args.xen_syms), "-o", str(out),
                                  "-q"])
                if proc.returncode != 0:
                    raise SystemExit(f"build {patch.name} failed: {proc.stderr.strip()}")
                builds.append(secs)
                secs, proc = run([*xsb, "prove", str(out), "--srcdir", str(args.tree),
                                  "--patch", str(patch), "--json", "-q"])
                doc = json.loads(proc.stdout)
                if doc["verdict"] != "proven":
                    raise SystemExit(f"prove {patch.name}: {doc['verdict']}: "
                                     f"{doc['reason'] or doc['differences'][:1]}")
                proofs.append((secs, doc["timings"]))
            best_build = min(builds)
            total, timings = min(proofs, key=lambda p: p[0])
            rows.append((patch.stem, best_build, total, timings.get("make", 0.0),
                         timings.get("compare", 0.0)))
    print(f"{'patch':28} {'build s':>8} {'prove s':>8} {'make s':>8} {'compare s':>9} "
          f"{'prove/build':>11} {'compare/build':>13}")
    for stem, build, prove, make, compare in rows:
        print(f"{stem:28} {build:8.1f} {prove:8.1f} {make:8.1f} {compare:9.2f} "
              f"{prove / build:11.2f} {compare / build:13.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
