"""Issue 10: Debian trixie's shipped Xen 4.20.4+63, whose source package cannot be fetched here.

Its ``-dbg`` ``xen-syms`` (:func:`.upstream_tree.trixie_xen_syms`) is the target of a payload
for ``xen_extra_version`` built by ``xsbuild diff`` and ``link`` from upstream 4.20.4's
``common/version.o`` and a patched recompile of it (the function is the same in both; only its
address and the build-id come from trixie's binary).  ``check`` and ``inspect`` read trixie's
``xen-syms``; trixie's own hypervisor then boots under QEMU with its 6.12 dom0, and xsbuild
(privcmd) loads, lists, reverts and unloads the payload there while dom0 reads
``/sys/hypervisor/version/extra`` and trixie's ``xen-livepatch list`` agrees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from xsbuild.xensyms import XenSymbols

from .conftest import BootFn
from .debian_tree import recompile
from .dom0py import Dom0Python
from .qemu import Script
from .test_extra_version import READ_EXTRA, VERSION_OBJ, patched_version_source
from .upstream_tree import trixie_xen_syms, upstream_tree

pytestmark = pytest.mark.xen

NAME = "xsb_trixie"
NEW_STRING = "xsb-trixie"
PATIENT = "--retries 8 --timeout 200ms"


def _xsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, check=False)


@pytest.fixture(scope="module")
def xen_syms() -> Path:
    return trixie_xen_syms()


@pytest.fixture(scope="module")
def payload(xen_syms: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tree = upstream_tree("4.20.4")
    folder = tmp_path_factory.mktemp("trixie")
    patched = recompile(tree, VERSION_OBJ, patched_version_source(tree, NEW_STRING),  # type: ignore[arg-type]
                        folder / "patched" / "version.o")
    diffed = folder / "diff" / "version.o"
    diffed.parent.mkdir()
    out = folder / f"{NAME}.livepatch"
    for argv in (("diff", str(tree.xen_dir / VERSION_OBJ), str(patched), "-o", str(diffed)),
                 ("link", str(diffed), "-o", str(out), "--xen-syms", str(xen_syms))):
        run = _xsbuild(*argv)
        assert run.returncode == 0, f"xsbuild {argv[0]}: {run.stderr}"
    return out


def test_check_and_inspect_read_trixies_xen_syms(payload: Path, xen_syms: Path) -> None:
    check = _xsbuild("check", str(payload), "--xen-syms", str(xen_syms))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "loader rules of Xen 4.20" in check.stdout, check.stdout
    inspect = _xsbuild("inspect", str(payload), "--xen-syms", str(xen_syms), "--format", "json")
    assert inspect.returncode == 0, inspect.stderr
    doc = json.loads(inspect.stdout)
    [func] = doc["funcs"]
    target = XenSymbols.load(xen_syms).lookup("xen_extra_version")
    assert func["name"] == "xen_extra_version" and target is not None
    assert int(func["old_addr"], 16) == target.addr, func


def test_xsbuild_drives_trixies_hypervisor(payload: Path, xen_boot: BootFn,
                                           dom0_python: Dom0Python) -> None:
    dom0_payload = f"/payload/{payload.name}"
    script = (Script(preamble=dom0_python.env)
              .step("extra-before", READ_EXTRA)
              .step("list-json", "xsbuild list --json")
              .step("load", f"xsbuild load {dom0_payload} {PATIENT}")
              .step("extra-applied", READ_EXTRA)
              .step("xsb-list", "xsbuild list")
              .step("xl-list", "xen-livepatch list")
              .step("revert", f"xsbuild revert {NAME} {PATIENT}")
              .step("extra-reverted", READ_EXTRA)
              .step("unload", f"xsbuild unload {NAME}")
              .step("list-end", "xsbuild list"))
    result = xen_boot(script, {**dom0_python.files(), payload: dom0_payload}, suite="trixie")
    why = result.describe()
    for step in result.steps.values():
        assert step.rc == 0, f"step {step.name} failed (rc={step.rc}):\n{step.output}\n{why}"
    assert result.hypervisor_errors([r"finished (APPLY|REVERT) with rc=-16$"]) == [], why
    info = json.loads(result.step("list-json").output)
    assert info["interface_version"] == "0x15" and info["xen_version"].startswith("4.20"), info
    before = result.step("extra-before").output.strip()
    assert result.step("extra-applied").output.strip() == NEW_STRING, why
    assert result.step("extra-reverted").output.strip() == before, why
    ours = [line.rstrip() for line in result.step("xsb-list").output.splitlines()]
    theirs = [line.rstrip() for line in result.step("xl-list").output.splitlines()]
    assert ours == theirs and any(NAME in line and "APPLIED" in line for line in ours), why
    assert "Nothing to list" in result.step("list-end").output, why
