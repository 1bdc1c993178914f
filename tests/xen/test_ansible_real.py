"""Issue 12 on real Xen: the example Ansible role rolls a payload out in dom0, once.

``examples/ansible`` (``rollout.yml`` and the role ``xsbuild_livepatch``) runs with
``ansible-playbook`` inside dom0 on Debian's Xen 4.17 under QEMU, ``connection: local`` against an
inventory of ``localhost``, with a real index: ``xsbuild index`` over the payload the other real-Xen
tests build (``xen_extra_version`` from a recompiled ``common/version.o``, diffed and linked against
Debian's ``xen-syms``).  ansible-core comes from PyPI into ``/opt/pyextra``
(:func:`tests.xen.dom0py.get_dom0_python` with ``extra``); the module interpreter is dom0's
Python, its environment inherited from the playbook's (``PYTHONHOME`` and the rest).

In the one boot: the rollout play (the role reads the build-id, uploads, checks the SHA-256, loads
through privcmd with retries, verifies), then ``xsbuild list --json`` and the live
``/sys/hypervisor/version/extra`` outside Ansible, then ``xsbuild revert`` and ``unload`` and a last
listing.  (A second play that reverts cost minutes of TCG per run; the role's revert on failure is
exercised against the simulator hosts in ``tests/test_fleet_ansible.py``.)

What the busybox dom0 lacks for Ansible, and where it is supplied:

* a locale: ansible refuses to start without a UTF-8 one, and the busybox dom0 has none at all
  (Python falls back to "C"; step ``locale-bare`` shows it).  Not the role's doing: a real Debian
  dom0 has ``C.UTF-8`` from libc-bin.  The test environment ships it (``utf8=True``).
* an ``ansible-playbook`` executable: ``pip --target`` writes its console scripts with the test
  host's interpreter in the ``#!`` line, so dom0 runs ``python3 -m ansible.cli.playbook``.

The role itself needed no change: it calls xsbuild through ``xsbuild_command`` (an argv, no shell,
no ``/usr/bin/env``), hashes with the ``stat`` module (Python, not ``sha256sum``) and gathers no
facts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import BootFn
from .debian_tree import DebianTree, read_build_id
from .dom0py import PY_DIR, Dom0Python, get_dom0_python
from .qemu import BootResult, Script
from .test_apply_real import NAME, NEW_STRING, build_payload
from .test_extra_version import READ_EXTRA

pytestmark = pytest.mark.xen

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_EXAMPLE = REPO / "examples" / "ansible"
# The ansible-core the role is known to work with (the fleet test's controller runs it too).
ANSIBLE_CORE = "ansible-core==2.19.14"
TARGET = "bookworm"  # payloads/TARGET/NAME.livepatch, as the CI jobs lay them out

# Where things are in dom0.
DOM0_PYTHON = f"{PY_DIR}/usr/bin/python3"
DOM0_EXAMPLE = "/opt/xsb-ansible"
DOM0_RUN = "/opt/xsb-ansible-run"  # the inventory
DOM0_PAYLOADS = "/payloads"
DOM0_REPORTS = "/tmp/reports"
# TCG gathers the vCPUs in tens of ms (tests/xen/test_apply_real.py): timeouts growing to 200 ms.
RETRIES = {"xsbuild_retries": 8, "xsbuild_timeout_start": "10ms", "xsbuild_timeout": "200ms"}
# A boot with an ansible-playbook run under TCG: minutes, and more on a loaded host.
BOOT_TIMEOUT = 2400.0

# ansible-playbook's environment in dom0: its state on the tmpfs, plain output, and pipelining
# (modules fed to the interpreter on stdin: fewer shell round trips per task, which cost seconds
# each under TCG; the local connection supports it).
ANSIBLE_ENV = f"""\
export ANSIBLE_HOME=/tmp/ansible ANSIBLE_LOCAL_TEMP=/tmp/ansible/tmp \
ANSIBLE_REMOTE_TEMP=/tmp/ansible/remote ANSIBLE_NOCOLOR=1 ANSIBLE_RETRY_FILES_ENABLED=0 \
ANSIBLE_PIPELINING=1
mkdir -p {DOM0_REPORTS}
cd /root
mark() {{ echo "@@uptime $1 $(cut -d' ' -f1 /proc/uptime)"; }}
"""
UPTIME_RE = re.compile(r"^@@uptime (\S+) ([0-9.]+)$", re.MULTILINE)

@pytest.fixture(scope="module")
def dom0_ansible() -> Dom0Python:
    """dom0's Python with ansible-core and the C.UTF-8 locale (see the module's docstring)."""
    return get_dom0_python(extra=(ANSIBLE_CORE,), utf8=True)


def payload_index(tree: DebianTree, folder: Path) -> tuple[Path, dict]:
    """payloads/TARGET/NAME.livepatch (the real-Xen tests' payload) and its index.json."""
    built = build_payload(tree, folder / "build")
    payloads = folder / "payloads"
    (payloads / TARGET).mkdir(parents=True)
    shutil.copyfile(built, payloads / TARGET / built.name)
    proc = subprocess.run([sys.executable, "-m", "xsbuild", "index", "--payloads", str(payloads)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    return payloads, json.loads((payloads / "index.json").read_text())


def run_folder(folder: Path) -> Path:
    """The inventory (localhost, local connection, dom0's Python)."""
    run = folder / "ansible-run"
    run.mkdir()
    host = {"ansible_connection": "local", "ansible_python_interpreter": DOM0_PYTHON}
    inventory = {"all": {"children": {"xen_hosts": {"hosts": {"localhost": host}}},
                         "vars": {"xsbuild_command": [DOM0_PYTHON, "-m", "xsbuild"],
                                  "xsbuild_index": f"{DOM0_PAYLOADS}/index.json",
                                  "xsbuild_report_dir": DOM0_REPORTS, **RETRIES}}}
    (run / "inventory.yml").write_text(yaml.safe_dump(inventory, sort_keys=False))
    return run


def playbook(playbook_path: str, tag: str) -> str:
    return (f"mark {tag}-start\n"
            f"python3 -m ansible.cli.playbook -i {DOM0_RUN}/inventory.yml {playbook_path}\n"
            f"rc=$?\nmark {tag}-end\nexit $rc")


def ansible_script(dom0: Dom0Python) -> Script:
    script = Script(preamble=dom0.env + ANSIBLE_ENV)
    # Python's locale without LANG/LOCPATH, as the busybox dom0 has it (why utf8=True).
    script.step("locale-bare", "env -u LANG -u LOCPATH python3 -c 'import locale; "
                               "locale.setlocale(locale.LC_ALL, \"\"); print(locale.getlocale())'")
    script.step("extra-before", READ_EXTRA)
    script.step("rollout", playbook(f"{DOM0_EXAMPLE}/rollout.yml", "rollout"))
    script.step("report", f"cat {DOM0_REPORTS}/localhost.json")
    script.step("list-applied", "xsbuild list --json")
    script.step("extra-applied", READ_EXTRA)
    script.step("revert", f"xsbuild revert {NAME} --retries {RETRIES['xsbuild_retries']} "
                          f"--timeout-start {RETRIES['xsbuild_timeout_start']} "
                          f"--timeout {RETRIES['xsbuild_timeout']}")
    script.step("unload", f"xsbuild unload {NAME}")
    script.step("list-end", "xsbuild list --json")
    script.step("extra-end", READ_EXTRA)
    return script


def states(result: BootResult, step: str) -> dict[str, str]:
    listed = result.step(step)
    assert listed.rc == 0, listed.output
    return {p["name"]: p["state"] for p in json.loads(listed.output)["payloads"]}


def play_recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counters of localhost (ok, changed, failed, ...)."""
    match = re.search(r"^localhost\s*:\s*(.*)$", output, re.MULTILINE)
    assert match, output
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


def elapsed(result: BootResult, tag: str) -> str:
    """How long an ansible-playbook run took in dom0 (its uptime marks)."""
    marks = dict(UPTIME_RE.findall(result.output))
    if f"{tag}-end" not in marks or f"{tag}-start" not in marks:
        return "unfinished"
    return f"{float(marks[f'{tag}-end']) - float(marks[f'{tag}-start']):.0f} s"


def test_ansible_role_rolls_out_in_dom0(debian_tree: DebianTree, dom0_ansible: Dom0Python,
                                        xen_boot: BootFn, tmp_path: Path) -> None:
    payloads, index = payload_index(debian_tree, tmp_path)
    (entry,) = index["payloads"]
    xen_id = read_build_id(debian_tree.debian_xen_syms)
    assert entry["name"] == NAME and entry["xen_build_id"] == xen_id, entry
    run = run_folder(tmp_path)
    files = {**dom0_ansible.files(), ANSIBLE_EXAMPLE: DOM0_EXAMPLE, run: DOM0_RUN,
             payloads: DOM0_PAYLOADS}
    result = xen_boot(ansible_script(dom0_ansible), files, timeout=BOOT_TIMEOUT)
    why = result.describe()
    timings = f"QEMU run {result.seconds:.0f} s; in dom0: rollout {elapsed(result, 'rollout')}"
    (tmp_path / "timings.txt").write_text(timings + "\n")
    print(timings)  # shown with pytest -s

    assert "None" in result.step("locale-bare").output, result.step("locale-bare").output

    rollout = result.step("rollout")
    assert rollout.rc == 0, f"{rollout.output}\n{why}"
    recap = play_recap(rollout.output)
    assert recap["failed"] == 0 and recap["unreachable"] == 0 and recap["changed"] >= 1, recap
    report = json.loads(result.step("report").output)
    assert report["host"] == "localhost" and report["status"] == "applied", report
    assert report["build_id"] == xen_id and report["wanted"] == [NAME], report
    assert report["applied"] == [NAME] and report["already_applied"] == [], report
    assert report["attempts"][NAME] >= 1 and report["error"] == "", report

    assert states(result, "list-applied") == {NAME: "APPLIED"}
    assert result.step("extra-applied").output.strip() == NEW_STRING, why

    for step in ("revert", "unload"):
        assert result.step(step).rc == 0, f"{result.step(step).output}\n{why}"
    assert states(result, "list-end") == {}
    before = result.step("extra-before").output.strip()
    assert before != NEW_STRING and result.step("extra-end").output.strip() == before, why

    messages = "\n".join(result.livepatch_messages())
    assert f"livepatch: {NAME} finished APPLY with rc=0" in messages, messages
    assert f"livepatch: {NAME} finished REVERT with rc=0" in messages, messages
    # Rendezvous timeouts of attempts that the retries then repeated are the only complaints.
    unexpected = [line for line in result.hypervisor_errors()
                  if not re.search(rf"{NAME} finished (APPLY|REVERT) with rc=-16$", line)]
    assert unexpected == [], why
