"""``xsbuild demo``, the README's first command: it must work on a fresh machine and prove what
it claims (the applied payload behaves like the patched build)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.toolchain import readelf


def xsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, check=False)


def test_demo_builds_checks_and_runs_the_fix(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    run = xsbuild("demo", "-w", str(work))
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    # Progress on stderr, one line per step; the report on stdout.
    assert [ln for ln in run.stderr.splitlines() if ln.startswith("[")][-1].startswith("[6/6]")
    out = run.stdout
    assert "changed: xen_extra_version" in out and "changed: xen_check_vcpus" in out
    assert "unchanged, left in the hypervisor: xen_extra_version_reads" in out
    rows = {ln.split()[0]: ln.split()[1:4] for ln in out.splitlines()
            if ln.startswith("  xen_")}
    assert rows["xen_extra_version()"] == ['"-demo"', '"-demo-fixed"', '"-demo"']
    assert rows["xen_check_vcpus(0)"] == ["0", "-22", "0"]  # the bug, fixed live, then back
    assert rows["xen_check_vcpus(4)"] == ["0", "0", "0"]
    assert rows["xen_extra_version_reads()"] == ["1", "2", "3"]  # state carried across
    # What it kept is a real payload: the CLI's check and binutils agree.
    payload, xen_syms = work / "demo.livepatch", work / "xen-syms"
    check = xsbuild("check", str(payload), "--xen-syms", str(xen_syms))
    assert check.returncode == 0, check.stdout + check.stderr
    sections = readelf("-S", payload)
    assert ".livepatch.funcs" in sections and ".livepatch.xen_depends" in sections


def test_demo_with_a_relative_workdir(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "xsbuild", "demo", "-w", "out"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "demo.livepatch").is_file()


def test_demo_without_workdir_leaves_nothing(tmp_path: Path) -> None:
    env_tmp = tmp_path / "tmp"
    env_tmp.mkdir()
    env = {"TMPDIR": str(env_tmp), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "xsbuild", "demo"], capture_output=True,
                         text=True, check=False, env=env)
    assert run.returncode == 0, run.stderr
    assert list(env_tmp.iterdir()) == []


def test_demo_refuses_a_non_empty_workdir(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("x")
    run = xsbuild("demo", "-w", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"xsbuild: error: {tmp_path} exists and is not an empty directory"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["something"]
