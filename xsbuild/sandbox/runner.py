"""Run loader scripts in a child process and compare patched behaviour with the patched build.

The proof for one payload (:func:`behaviour_proof`), with no hard-coded answers:

1. child A loads the ORIGINAL image, calls every function (phase "before"), loads and applies the
   payload, calls them again ("applied"), reverts, calls again ("reverted");
2. child B loads the PATCHED image and makes the same three rounds of calls with no payload;
3. child C loads the ORIGINAL image and makes the three rounds with no payload.

"applied" of A must equal the second round of B (so state carried by unchanged statics, such as a
counter, must continue exactly as in the patched build); "before" and "reverted" of A must equal
the first and third rounds of C.  A crash or hang of a child is reported with its stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xsbuild.errors import XsbuildError

CHILD_TIMEOUT = 30.0  # seconds; a child normally needs well under one


class ChildFailed(XsbuildError):
    """The loader child crashed, hung, refused or printed no result; the message has its
    stderr."""


@dataclass(frozen=True)
class Call:
    """A function of the image (Xen name) with integer arguments and a return kind."""

    fn: str
    args: tuple[int, ...] = ()
    ret: str = "int"

    def to_json(self) -> dict[str, Any]:
        return {"fn": self.fn, "args": list(self.args), "ret": self.ret}


def run_child(script: dict[str, Any], timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    """Run the loader on ``script`` in a fresh interpreter; return its JSON answer."""
    # The directory holding the xsbuild package, so a source checkout works uninstalled.
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get(
        "PYTHONPATH")])), PYTHONFAULTHANDLER="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "xsbuild.sandbox.loader"],
                              input=json.dumps(script),
                              capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ChildFailed(f"loader child hung for {timeout}s; stderr:\n{exc.stderr}") from None
    if proc.returncode != 0:
        raise ChildFailed(f"loader child died with status {proc.returncode} "
                          f"(negative = signal); stderr:\n{proc.stderr}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise ChildFailed(f"loader child printed no JSON: {proc.stdout!r}\n{proc.stderr}"
                          ) from None


def calls_op(calls: list[Call]) -> dict[str, Any]:
    return {"op": "calls", "calls": [c.to_json() for c in calls]}


def load_and_apply(image: Path, payload: Path, calls: list[Call]) -> dict[str, Any]:
    """Child A: before / load+apply / applied / revert / reverted / unload."""
    ops = [calls_op(calls), {"op": "load", "payload": str(payload)}, {"op": "apply"},
           calls_op(calls), {"op": "revert"}, calls_op(calls), {"op": "unload"}]
    return run_child({"image": str(image), "ops": ops})


def plain_rounds(image: Path, calls: list[Call], rounds: int = 3) -> list[Any]:
    """Children B and C: the same calls ``rounds`` times on an unpatched image."""
    answer = run_child({"image": str(image), "ops": [calls_op(calls)] * rounds})
    if answer["error"]:
        raise ChildFailed(f"calls on {image} failed: {answer['error']}")
    return answer["results"]


@dataclass
class Proof:
    """The three views of one behaviour proof, for assertion messages."""

    before: list[Any]
    applied: list[Any]
    reverted: list[Any]
    expected_before: list[Any]
    expected_applied: list[Any]
    expected_reverted: list[Any]
    patch_offsets: list[int]  # per patched function: 4 when written after ENDBR64, else 0

    def problems(self, calls: list[Call]) -> list[str]:
        """Human-readable mismatches; empty when the payload behaves as the patched build."""
        out = []
        for phase in ("before", "applied", "reverted"):
            got, want = getattr(self, phase), getattr(self, f"expected_{phase}")
            for call, g, w in zip(calls, got, want, strict=True):
                if g != w:
                    out.append(f"{phase}: {call.fn}{call.args} = {g!r}, expected {w!r}")
        return out


def behaviour_proof(orig_image: Path, patched_image: Path, payload: Path,
                    calls: list[Call]) -> Proof:
    """Run the three children of the module docstring; raise ChildFailed on a refusal."""
    answer = load_and_apply(orig_image, payload, calls)
    if answer["error"]:
        raise ChildFailed(f"the loader refused {payload.name}: {answer['error']['name']}: "
                          f"{answer['error']['message']}")
    before, _load, patched_at, applied, _revert, reverted, _unload = answer["results"]
    patched = plain_rounds(patched_image, calls)
    original = plain_rounds(orig_image, calls)
    return Proof(before, applied, reverted, original[0], patched[1], original[2],
                 [offset for _addr, offset in patched_at])
