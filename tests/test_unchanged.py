"""Behaviour unchanged: for every fixture scenario that existed at
:data:`tests.support.baseline.BASE_COMMIT`, ``xsbuild diff`` and ``xsbuild link`` of the current
code produce byte-identical outputs and the same exit codes as the code of that commit, run side
by side in the same session.  Scenarios added since then test new behaviour (a changed const
table carried, say); messages may have been reworded, so stdout is not compared.

The slow twin on Debian's tree is ``tests/xen/test_unchanged_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.baseline import (
    BASE_COMMIT,
    COPY_NAMES,
    REPO,
    baseline_checkout,
    baseline_missing,
    without_copy_names,
    xsbuild_at,
)
from tests.support.image import Image, build_image
from tests.support.toolchain import Toolchain
from tests.test_scenarios import SCENARIO_DIRS, base_sources, load_scenario, patched_sources


@pytest.fixture(scope="session")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = baseline_missing()
    if reason:
        pytest.skip(f"behaviour-unchanged guard: {reason}")
    return baseline_checkout(tmp_path_factory.mktemp("baseline"))


@pytest.fixture(scope="session")
def guard_image(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build_image(toolchain, base_sources(), tmp_path_factory.mktemp("gorig") / "xen-syms")


def run_both(baseline: Path, out: Path, *args: str | Path,
             intended: str = "") -> tuple[int, bytes | None]:
    """Run one command with the base code then the current code, both writing ``out``; assert
    the same exit code, stdout and output bytes.  Returns (exit code, output bytes or None)."""
    results = []
    for code in (baseline, REPO):
        if out.exists():
            out.unlink()
        proc = xsbuild_at(code, *args, timeout=120)
        data = out.read_bytes() if out.exists() else None
        results.append((proc.returncode, proc.stdout, data, proc.stderr))
    (rc0, _out0, data0, _err0), (rc1, _out1, data1, err1) = results
    what = f"xsbuild {' '.join(map(str, args))}"
    assert rc1 == rc0, f"{what}: exit {rc1}, base {BASE_COMMIT} exit {rc0}\n{err1.decode()}"
    assert (data1 is None) == (data0 is None), f"{what}: output exists only on one side"
    if intended == COPY_NAMES and data1 is not None and data0 is not None:
        assert without_copy_names(data1) == without_copy_names(data0), \
            f"{what}: output differs from base {BASE_COMMIT} beyond the names of copies"
    else:
        assert data1 == data0, f"{what}: output bytes differ from base {BASE_COMMIT}"
    return rc1, data1


@pytest.mark.parametrize("directory", SCENARIO_DIRS, ids=[d.name for d in SCENARIO_DIRS])
def test_payload_bytes_unchanged(directory: Path, toolchain: Toolchain, guard_image: Image,
                                 baseline: Path, tmp_path: Path) -> None:
    if not (baseline / "fixtures" / "scenarios" / directory.name).is_dir():
        pytest.skip(f"{directory.name} is newer than {BASE_COMMIT}: new behaviour, not a guard")
    scenario = load_scenario(directory)
    patched = patched_sources(scenario.patch, tmp_path)
    base = base_sources()
    outputs = []
    for index, exp in enumerate(scenario.objects):
        orig_obj = toolchain.compile_source(base[exp.file], exp.file)
        patched_obj = toolchain.compile_source(patched[exp.file], exp.file)
        out = tmp_path / f"out{index}" / Path(exp.file).with_suffix(".o").name
        out.parent.mkdir()
        rc, data = run_both(baseline, out, "diff", orig_obj, patched_obj, "-o", out, "--json",
                            *exp.diff_args)
        assert rc == exp.exit
        if data is not None:
            outputs.append(out)
    if not scenario.links:
        return
    payload = tmp_path / f"{scenario.name}.livepatch"
    rc, data = run_both(baseline, payload, "link", *outputs, "-o", payload, "--xen-syms",
                        guard_image.path, intended=COPY_NAMES)
    assert rc == scenario.link_exit
    assert (data is not None) == (rc == 0), "a payload must exist exactly when link succeeds"
