"""``xsbuild --debug diff`` traces the differ's correlation and classification on stderr, and
leaves stdout and the exit code as without it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.toolchain import Toolchain

UNIT = "common/dbg.c"
ORIG = """
static int counter;
static int bump(int x) { static int calls; calls++; return x + calls + counter; }
int dbg_entry(int x) { return bump(x) * 2; }
"""
PATCHED = ORIG.replace("* 2", "* 3")


def _diff(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def test_debug_traces_decisions(toolchain: Toolchain, tmp_path: Path) -> None:
    orig = toolchain.compile_source(ORIG, UNIT)
    patched = toolchain.compile_source(PATCHED, UNIT)
    plain = _diff("diff", orig, patched, "--json")
    traced = _diff("--debug", "diff", orig, patched, "--json")
    assert plain.returncode == traced.returncode == 0, traced.stderr
    assert plain.stdout == traced.stdout
    assert "correlate: dbg_entry <-> dbg_entry (same name)" in traced.stderr
    assert "compare: dbg_entry changed" in traced.stderr
    assert "correlate:" not in plain.stderr
