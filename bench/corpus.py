#!/usr/bin/env python3
"""Every real change of the public corpus through ``xsbuild build``: built, refused, or failed.

For each patch of ``../shared/corpus-public/`` (real upstream commits of stable-4.17, each undone
on Debian's 4.17.5+72 tree) this runs ``xsbuild build --json`` against the built Debian tree as a
user would (a new process each), then ``xsbuild check`` on every payload it wrote, and sorts the
outcomes:

* built: exit 0 and ``check`` accepts the payload;
* refused: exit 1 (an unpatchable change, by reason) or 3 (no functional change);
* does not compile: exit 2 with a compiler error that the tree's own make reproduces on a
  patched copy of the tree (an undone commit that later code depends on: not xsbuild's to fix);
* failed: anything else (exit 2 for a patch that applies and compiles, 5, 70, a traceback, or a
  payload ``check`` rejects).  A failure is a bug to fix; the script exits 1 when there is one.

With ``--prove`` every payload is also proven (``xsbuild prove``: the tree's own make builds the
patched hypervisor, the payload must be its code and carry every function the patch changes);
a payload not proven, or that cannot be judged, is a failure.

    python3 bench/corpus.py [--tree TOP] [--xen-syms F] [--corpus DIR] [-j N] [--only 001,053]
                            [--json FILE] [--prove]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from debian_tree import default_top, default_xen_syms

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "corpus-public"
XEN_MAKE = REPO.parent / "shared" / "harness" / "xen-make.sh"
_COMPILE_FAILED = re.compile(r"compiling (\S+) failed in the patched tree")

# A refusal's category, from the first problem line; the first pattern that matches wins.
REASONS = [
    ("struct layout change", re.compile(r"layout")),
    ("changed __init code or data", re.compile(r"__init|\.init\b|init code")),
    ("changed writable data", re.compile(r"changed (data|\.bss|bss)|writable")),
    ("changed read-only data", re.compile(r"read-only|rodata|const")),
    ("assembly change", re.compile(r"assembly")),
    ("deleted or new file kind", re.compile(r"deleting|new assembly")),
    ("static local", re.compile(r"static local")),
    ("no functional change", re.compile(r"no functional change")),
]


@dataclass
class Outcome:
    patch: str
    status: str  # built, refused, failed
    exit_code: int
    reason: str
    detail: str
    seconds: float
    proof: str = ""  # --prove: proven, not-proven, cannot-judge


def classify(patch: Path, code: int, stderr: str, checked: tuple[int, str] | None,
             seconds: float) -> Outcome:
    lines = [ln.removeprefix("xsbuild: ") for ln in stderr.splitlines() if ln.strip()]
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    problem = next((ln.strip() for ln in lines[lines.index("error: " + errors[0]) + 1:]
                    if ln.startswith("  ")), errors[0]) if errors else (lines[-1] if lines else "")
    if "Traceback" in stderr:
        return Outcome(patch.name, "failed", code, "traceback", lines[-1] if lines else "", seconds)
    if code == 0:
        if checked is not None and checked[0] != 0:
            return Outcome(patch.name, "failed", code, "check rejects the payload", checked[1],
                           seconds)
        return Outcome(patch.name, "built", code, "", "", seconds)
    if code in (1, 3):
        reason = next((name for name, rx in REASONS if rx.search(problem)), "other refusal")
        return Outcome(patch.name, "refused", code, reason, problem[:300], seconds)
    return Outcome(patch.name, "failed", code, f"exit {code}", problem[:300], seconds)


def run_one(patch: Path, top: Path, xen_syms: Path, out_dir: Path, jobs: int,
            prove: bool = False) -> Outcome:
    payload = out_dir / (patch.stem + ".livepatch")
    argv = [sys.executable, "-m", "xsbuild", "build", "--srcdir", str(top), "--patch",
            str(patch), "--xen-syms", str(xen_syms), "-o", str(payload), "-j", str(jobs),
            "--json"]
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    seconds = round(time.monotonic() - start, 1)
    checked = None
    if proc.returncode == 0:
        chk = subprocess.run([sys.executable, "-m", "xsbuild", "check", str(payload),
                              "--xen-syms", str(xen_syms)], capture_output=True, text=True,
                             check=False)
        checked = (chk.returncode, (chk.stdout + chk.stderr).strip().splitlines()[-1:] or [""])
        checked = (checked[0], checked[1][0])
    outcome = classify(patch, proc.returncode, proc.stderr, checked, seconds)
    failed_obj = _COMPILE_FAILED.search(proc.stderr)
    if outcome.exit_code == 2 and failed_obj and make_fails_too(top, patch, failed_obj.group(1)):
        outcome.status, outcome.reason = "no-compile", f"{failed_obj.group(1)} does not compile"
    if prove and outcome.status == "built":
        outcome = prove_one(outcome, patch, payload, top)
    return outcome


def prove_one(outcome: Outcome, patch: Path, payload: Path, top: Path) -> Outcome:
    proc = subprocess.run([sys.executable, "-m", "xsbuild", "prove", str(payload), "--srcdir",
                           str(top), "--patch", str(patch), "--json", "-q"],
                          capture_output=True, text=True, check=False)
    try:
        verdict = json.loads(proc.stdout)["verdict"]
    except (ValueError, KeyError):
        verdict = f"exit {proc.returncode}"
    outcome.proof = verdict
    if verdict != "proven":
        outcome.status, outcome.reason = "failed", f"not proven ({verdict})"
        outcome.detail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
    return outcome


def make_fails_too(top: Path, patch: Path, obj: str) -> bool:
    """Does the tree's own make fail on that object in a patched copy of the tree?"""
    with tempfile.TemporaryDirectory(prefix="xsb-corpus-make-") as tmp:
        copy = Path(tmp) / top.name
        shutil.copytree(top, copy, symlinks=True)
        subprocess.run(["patch", "-p1", "-s", "-i", str(patch)], cwd=copy, check=True)
        run = subprocess.run(["bash", str(XEN_MAKE), obj], env={**os.environ, "XENSRC": str(copy)},
                             capture_output=True, text=True, check=False)
        return run.returncode != 0


def table(outcomes: list[Outcome]) -> str:
    by_status = Counter(o.status for o in outcomes)
    by_reason = Counter(o.reason for o in outcomes if o.status == "refused")
    built = [o.seconds for o in outcomes if o.status == "built"]
    rows = [f"corpus: {len(outcomes)} patches",
            "| outcome | patches | seconds per patch (mean) |", "|---|---|---|"]
    for status in ("built", "refused", "no-compile", "failed"):
        secs = [o.seconds for o in outcomes if o.status == status]
        mean = f"{sum(secs) / len(secs):.1f}" if secs else "-"
        rows.append(f"| {status} | {by_status[status]} | {mean} |")
        if status == "refused":
            rows.extend(f"| refused: {reason} | {n} | |" for reason, n in by_reason.most_common())
    if built:
        rows.append(f"built payloads: {min(built):.1f}-{max(built):.1f} s each")
    proven = [o for o in outcomes if o.proof == "proven"]
    if any(o.proof for o in outcomes):
        rows.append(f"proven (xsbuild prove): {len(proven)} of "
                    f"{sum(1 for o in outcomes if o.proof)} payloads")
    for o in outcomes:
        if o.status == "failed":
            rows.append(f"FAILED {o.patch}: {o.reason}: {o.detail}")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", type=Path, default=default_top())
    ap.add_argument("--xen-syms", type=Path, default=default_xen_syms())
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("-j", "--jobs", type=int, default=2, help="compiles per build")
    ap.add_argument("--only", default="", help="comma-separated patch number prefixes")
    ap.add_argument("--json", type=Path, help="also write every outcome as JSON")
    ap.add_argument("--prove", action="store_true", help="also prove every payload built")
    args = ap.parse_args()
    patches = sorted(args.corpus.glob("*.patch"))
    if args.only:
        wanted = tuple(args.only.split(","))
        patches = [p for p in patches if p.name.startswith(wanted)]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="xsb-corpus-") as tmp:
        for patch in patches:
            o = run_one(patch, args.tree, args.xen_syms, Path(tmp), args.jobs, args.prove)
            print(f"{o.patch[:60]:<60} {o.status:<8} {o.seconds:>6.1f}s {o.reason}", flush=True)
            outcomes.append(o)
    print(table(outcomes))
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1) + "\n")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
