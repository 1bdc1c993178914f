"""Fuzz `diff` and `check` with mutated real objects: every outcome is a result or a typed
xsbuild error (one line, exit 1/2/3), never an internal error or a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_core import ORIG, PATCHED, UNIT, Built
from tests.test_core import built as built
from xsbuild.check import check_payload
from xsbuild.diff import diff_objects
from xsbuild.elf import read_elf
from xsbuild.errors import XsbuildError

_ = (ORIG, PATCHED, UNIT)

mutations = st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1,
                     max_size=8)


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        out[pos % len(out)] = value
    return bytes(out)


SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(edits=mutations, which=st.sampled_from(["orig", "patched"]))
def test_diff_survives_mutated_objects(built: Built, edits: list[tuple[int, int]], which: str):
    src = built.orig if which == "orig" else built.patched
    data = _mutate(src.read_bytes(), edits)
    try:
        mutated = read_elf(src, data=data)
        other = read_elf(built.patched if which == "orig" else built.orig)
        pair = (mutated, other) if which == "orig" else (other, mutated)
        result = diff_objects(*pair)
        result.to_json()
    except XsbuildError as exc:
        assert exc.return_code in (1, 2, 3)
        assert "\n" not in str(exc).strip() or exc.return_code == 1


@SETTINGS
@given(edits=mutations)
def test_check_survives_mutated_payloads(built: Built, edits: list[tuple[int, int]]):
    data = _mutate(built.payload.read_bytes(), edits)
    report = check_payload(data)
    assert all(p.errno > 0 for p in report.problems)


@pytest.mark.parametrize("seed", range(6))
def test_cli_on_mutated_objects_never_tracebacks(built: Built, tmp_path: Path, seed: int):
    data = bytearray(built.orig.read_bytes())
    step = max(1, len(data) // 7)
    for k in range(seed, len(data), step):  # a deterministic spread of corrupted bytes
        data[k] ^= 0x5A
    bad = tmp_path / "bad.o"
    bad.write_bytes(bytes(data))
    for args in (["diff", bad, built.patched, "-o", tmp_path / "o.o"], ["check", bad]):
        proc = subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode in (0, 1, 2, 3), proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
