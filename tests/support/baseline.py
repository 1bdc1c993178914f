"""The "behaviour unchanged" guard's baseline: xsbuild as it was at a fixed commit.

:func:`baseline_checkout` extracts the package at :data:`BASE_COMMIT` with ``git archive`` into
a scratch folder; :func:`xsbuild_at` runs ``python -m xsbuild`` with that folder (or the current
checkout) first on ``PYTHONPATH``.  The guard tests compare what both produce in the same run, so
no digest is ever hard-coded: a new compiler changes both sides alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# main's HEAD when the differ was redesigned (issue 11): the behaviour every later commit keeps.
BASE_COMMIT = "76bbfd1"


def baseline_missing() -> str:
    """Why the baseline cannot be extracted here ("" if it can)."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e",
                               f"{BASE_COMMIT}^{{commit}}"], capture_output=True, text=True,
                              check=False)
    except FileNotFoundError:
        return "git is not installed"
    if proc.returncode != 0:
        return f"git history does not hold the base commit {BASE_COMMIT} (shallow clone?)"
    return ""


def baseline_checkout(dest: Path) -> Path:
    """Extract the base commit's tree into ``dest`` (``git archive | tar -x``); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASE_COMMIT], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def xsbuild_at(code: Path, *args: str | Path, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m xsbuild ARGS`` running the package found in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    # -P: the current directory (the repository, under pytest) must not shadow PYTHONPATH.
    return subprocess.run([sys.executable, "-P", "-m", "xsbuild", *map(str, args)], env=env,
                          capture_output=True, timeout=timeout, check=False, cwd=cwd)
