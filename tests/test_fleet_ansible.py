"""``examples/ansible``: the rollout role, run by ``ansible-playbook`` against five local "hosts"
on the simulator backend (each its own state file, as each dom0 its own hypervisor).

h1, h2  the hypervisor the payloads are for: both payloads applied, in stack order
h3      the same hypervisor, one CPU 3 ms late to the rendezvous: needs retries
h4      the same hypervisor, with a stale payload named like the second one already uploaded:
        the second load fails, the first is reverted and unloaded, the host fails
h5      another hypervisor: no payload for it, nothing done

Batches of two (serial); with a failure threshold of 50% the third batch still runs, with 0%
the rollout stops after h4's batch and h5 is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_build import (  # noqa: F401 - fixtures
    built_tree_master,
    make_patch,
    replace_in,
)

REPO = Path(__file__).resolve().parents[1]
ANSIBLE = REPO / "examples" / "ansible"
HOSTS = ("h1", "h2", "h3", "h4", "h5")

# Minutes (two ansible-playbook runs per test, a Python start per xsbuild call): slow suite.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("ansible-playbook") is None,
                                 reason="needs ansible-core (pip install ansible-core)")]


def xsbuild(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                         text=True, check=False, env={**os.environ, **(env or {})})
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, built_tree_master: Path) -> Path:  # noqa: F811
    """payloads/ with xsa-1 and xsa-2 (stacked on xsa-1) for the fake tree's hypervisor, their
    index, a stale build of "xsa-2" and another hypervisor's xen-syms."""
    top = tmp_path_factory.mktemp("fleet")
    tree = built_tree_master
    syms = str(tree / "xen/xen-syms")
    out = top / "payloads/fake"
    out.mkdir(parents=True)
    p1 = make_patch(tree, {"xen/common/gamma.c": replace_in(tree, "xen/common/gamma.c", "0x5a",
                                                            "0x5b")}, top / "xsa-1.patch")
    p2 = make_patch(tree, {"xen/common/beta.c": replace_in(tree, "xen/common/beta.c", "- 1",
                                                           "- 5")}, top / "xsa-2.patch")
    first = json.loads(xsbuild("build", "--srcdir", str(tree), "--patch", str(p1), "--xen-syms",
                               syms, "-o", str(out / "xsa-1.livepatch"), "--json").stdout)
    xsbuild("build", "--srcdir", str(tree), "--patch", str(p1), "--patch", str(p2),
            "--xen-syms", syms, "-o", str(out / "xsa-2.livepatch"), "--depends",
            first["build_id"])
    stale = make_patch(tree, {"xen/common/beta.c": replace_in(tree, "xen/common/beta.c",
                                                              "- 1", "- 7")},
                       top / "stale.patch")
    xsbuild("build", "--srcdir", str(tree), "--patch", str(stale), "--xen-syms", syms, "-o",
            str(top / "stale.livepatch"))
    xsbuild("index", "--payloads", str(top / "payloads"))
    subprocess.run(["ld", "--build-id=sha1", "-e", "0", "-o", str(top / "other-syms"),
                    str(tree / "xen/common/gamma.o")], check=True)
    shutil.copyfile(syms, top / "xen-syms")
    return top


def setup_hosts(fleet: Path, work: Path) -> dict[str, Path]:
    """Each host's simulator state, created with its hypervisor; h4 gets the stale upload."""
    states = {}
    for host in HOSTS:
        state = work / host / "sim.json"
        state.parent.mkdir(parents=True)
        syms = fleet / ("other-syms" if host == "h5" else "xen-syms")
        xsbuild("list", "--backend", "sim", "--sim-state", str(state), "--sim-xen-syms",
                str(syms))
        states[host] = state
    xsbuild("upload", "xsa-2", str(fleet / "stale.livepatch"), "--backend", "sim",
            "--sim-state", str(states["h4"]))
    return states


def inventory(work: Path, states: dict[str, Path]) -> Path:
    hosts = {}
    for host, state in states.items():
        hosts[host] = {
            "ansible_connection": "local",
            "ansible_python_interpreter": sys.executable,
            "xsbuild_args": ["--backend", "sim", "--sim-state", str(state)],
            "xsbuild_remote_dir": str(work / host / "payloads"),
        }
    # A slow host: one CPU reaches the rendezvous 3 ms late, so the first attempts (1 ms,
    # 2.15 ms) time out and the growing timeouts get it in.
    hosts["h3"]["xsbuild_environment"] = {"XSBUILD_SIM_CPU_DELAYS": "0,3ms"}
    doc = {"all": {"children": {"xen_hosts": {"hosts": hosts}},
                   "vars": {"xsbuild_command": [sys.executable, "-m", "xsbuild"]}}}
    path = work / "inventory.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def playbook(work: Path, inv: Path, fleet: Path, max_fail: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCAL_TEMP": str(work / ".ansible"),
           "ANSIBLE_HOME": str(work / ".ansible"), "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "PYTHONPATH": os.environ.get("PYTHONPATH", str(REPO))}
    for var in ("XSBUILD_SIM_CPU_DELAYS", "XSBUILD_SIM_POLLS", "XSBUILD_SIM_STATE",
                "XSBUILD_BACKEND"):
        env.pop(var, None)
    return subprocess.run(
        ["ansible-playbook", "-i", str(inv), str(ANSIBLE / "rollout.yml"),
         "-e", f"xsbuild_index={fleet / 'payloads/index.json'}",
         "-e", f"xsbuild_report_dir={work / 'reports'}",
         "-e", "xsbuild_serial=2", "-e", f"xsbuild_max_fail_percentage={max_fail}",
         "-e", "xsbuild_timeout_start=1ms", "-e", "xsbuild_timeout=100ms",
         "-e", "xsbuild_retries=6"],
        capture_output=True, text=True, check=False, env=env, cwd=work)


def sim_list(state: Path) -> list[tuple[str, str]]:
    run = xsbuild("list", "--json", "--backend", "sim", "--sim-state", str(state))
    return [(p["name"], p["state"]) for p in json.loads(run.stdout)["payloads"]]


def batches(output: str) -> list[list[str]]:
    """The hosts of each batch (sorted: the hosts of one batch run in parallel and report in any
    order), from the play banners and the first task's results."""
    out: list[list[str]] = []
    for line in output.splitlines():
        if line.startswith("PLAY [Live-patch the Xen hosts]"):
            out.append([])
        elif out and line.startswith("ok: [") and "Read the payload index" not in line:
            host = line[5:].split("]")[0]
            if host not in out[-1]:
                out[-1].append(host)
    return [sorted(batch) for batch in out]


def reports(work: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((work / "reports").glob("*.json"))}


def test_rollout_in_batches_with_retries_and_a_reverted_host(fleet: Path,
                                                              tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    states = setup_hosts(fleet, tmp_path)
    run = playbook(tmp_path, inventory(tmp_path, states), fleet, max_fail=50)
    log = run.stdout + run.stderr
    assert run.returncode != 0, log  # h4 failed: ansible-playbook says so
    assert batches(run.stdout) == [["h1", "h2"], ["h3", "h4"], ["h5"]], log
    rep = reports(tmp_path)
    assert sorted(rep) == list(HOSTS)
    index = json.loads((fleet / "payloads/index.json").read_text())
    xen_id = index["payloads"][0]["xen_build_id"]
    for host in ("h1", "h2", "h3"):
        assert rep[host]["status"] == "applied", rep[host]
        assert rep[host]["build_id"] == xen_id
        assert rep[host]["applied"] == ["xsa-1", "xsa-2"]
        assert sim_list(states[host]) == [("xsa-1", "APPLIED"), ("xsa-2", "APPLIED")]
    assert rep["h1"]["attempts"] == {"xsa-1": 1, "xsa-2": 1}
    assert all(n >= 2 for n in rep["h3"]["attempts"].values()), rep["h3"]
    h4 = rep["h4"]
    assert h4["status"] == "failed-reverted" and h4["reverted"] == ["xsa-1"], h4
    assert "EEXIST" in h4["error"] and h4["applied"] == [], h4
    assert sim_list(states["h4"]) == [("xsa-2", "CHECKED")]  # the stale one, untouched
    assert "h4: Load xsa-2" in log and "reverted xsa-1" in log
    assert rep["h5"]["status"] == "no-payload" and sim_list(states["h5"]) == []
    assert rep["h5"]["build_id"] != xen_id
    # A second run changes nothing on the patched hosts.
    shutil.rmtree(tmp_path / "reports")
    (tmp_path / "reports").mkdir()
    run = playbook(tmp_path, inventory(tmp_path, states), fleet, max_fail=50)
    rep = reports(tmp_path)
    assert [rep[h]["status"] for h in ("h1", "h2", "h3")] == ["unchanged"] * 3
    assert rep["h1"]["already_applied"] == ["xsa-1", "xsa-2"]


def test_failure_threshold_stops_the_rollout(fleet: Path, tmp_path: Path) -> None:
    (tmp_path / "reports").mkdir()
    states = setup_hosts(fleet, tmp_path)
    run = playbook(tmp_path, inventory(tmp_path, states), fleet, max_fail=0)
    assert run.returncode != 0
    assert batches(run.stdout) == [["h1", "h2"], ["h3", "h4"]], run.stdout
    rep = reports(tmp_path)
    assert sorted(rep) == ["h1", "h2", "h3", "h4"]  # h5 was never reached
    assert rep["h4"]["status"] == "failed-reverted"
    assert sim_list(states["h5"]) == []
    assert sim_list(states["h1"]) == [("xsa-1", "APPLIED"), ("xsa-2", "APPLIED")]
