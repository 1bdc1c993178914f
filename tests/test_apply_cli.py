"""Every apply-tool command against the simulator, success and failure paths, exit codes and output.

Every test runs against each simulated Xen release of :data:`SIM_VERSIONS` (the ``xsb``
fixture is parametrized): interface 0x15 or 0x16, the op's flags, the loader's order.
Commands run in-process through :func:`xsbuild.cli.main` (the real error handler and exit codes);
two tests also start the console script in a subprocess to check the installed entry point and
that the simulator's state carries over between processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.handmade import HELLO_SOURCE, build_id_note
from tests.support.image import Image, read_build_id
from tests.test_apply_sim import (  # noqa: F401 - fixtures shared with the library tests
    HOOK_IMPL,
    PayloadFactory,
    _no_real_hypercalls,
    hv,
    make_payload,
    other_hv,
)
from xsbuild.cli import main
from xsbuild.hypercall import privcmd
from xsbuild.xen_versions import XenVersion


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)


# One release per behaviour that differs (xsbuild/xen_versions.py): 4.17.5 (Debian bookworm),
# 4.18.0 (no flags, funcs written at APPLY), 4.19.6 (FORCE, xen_depends first), 4.20.4,
# 4.21.2 (interface 0x16).
SIM_VERSIONS = ("4.17.5", "4.18.0", "4.19.6", "4.20.4", "4.21.2")


@pytest.fixture(params=SIM_VERSIONS)
def sim_version(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def xsb(tmp_path: Path, hv: Image, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str], sim_version: str):
    """``xsb("apply", "x", env={...})`` runs the CLI on a fresh simulator of ``sim_version``;
    returns a Result."""
    state = tmp_path / "sim.json"
    for var in ("XSBUILD_SIM_CPU_DELAYS", "XSBUILD_SIM_POLLS", "XSBUILD_SIM_INTERFACE",
                "XSBUILD_BACKEND", "XSBUILD_TRACEBACK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XSBUILD_SIM_STATE", str(state))
    monkeypatch.setenv("XSBUILD_SIM_XEN_VERSION", sim_version)
    first = [True]

    def call(*args: str, env: dict[str, str] | None = None) -> Result:
        argv = [*args, "--backend", "sim"]
        if first[0]:
            argv += ["--sim-xen-syms", str(hv.path)]
            first[0] = False
        with monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.setenv(key, value)
            try:
                main(argv)
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            else:
                rc = 0
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    return call


def one_line_error(res: Result) -> str:
    """The error must be one ``xsbuild: error:`` line, never a traceback."""
    lines = res.err.strip().splitlines()
    assert len(lines) == 1, res.err
    assert lines[0].startswith("xsbuild: error: "), res.err
    return lines[0]


def stacked(make_payload: PayloadFactory) -> tuple[Path, Path]:  # noqa: F811
    a = make_payload("stack_a")
    b = make_payload("stack_b", depends=build_id_note(bytes.fromhex(read_build_id(a))))
    return a, b


# ------------------------------------------------------------------------------------------------


def test_list_empty_and_json(xsb, hv: Image, sim_version: str) -> None:  # noqa: F811
    res = xsb("list")
    assert (res.rc, res.out.strip()) == (0, "Nothing to list")
    data = xsb("list", "--json").json()
    assert data["payloads"] == [] and data["build_id"] == hv.build_id
    new = XenVersion.parse(sim_version) >= XenVersion(4, 21, 0)
    assert data["interface_version"] == ("0x16" if new else "0x15")
    assert data["xen_version"] == sim_version  # the simulated release, read through XENVER


def test_upload_apply_revert_unload(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    path = make_payload("hello")
    res = xsb("upload", "hello", str(path))
    assert res.rc == 0 and "hello is CHECKED" in res.out
    listing = xsb("list")
    assert listing.out.splitlines()[0].startswith(" ID ")
    assert listing.out.splitlines()[2].split("|")[:2] == [f"{'hello':<40}", " CHECKED    "]

    res = xsb("apply", "hello")
    assert res.rc == 0 and "Applying hello... completed: APPLIED" in res.out
    res = xsb("apply", "hello")
    assert res.rc == 0 and "no action needed" in res.out

    res = xsb("unload", "hello")
    assert res.rc == 1 and "revert it first" in one_line_error(res)

    assert xsb("revert", "hello", "--json").json()["state_after"] == "CHECKED"
    res = xsb("unload", "hello")
    assert res.rc == 0 and "Unloading hello... completed" in res.out
    assert xsb("list", "--json").json()["payloads"] == []


def test_upload_failures(xsb, make_payload: PayloadFactory, other_hv: Image,  # noqa: F811
                         tmp_path: Path) -> None:
    path = make_payload("hello")
    assert xsb("upload", "hello", str(path)).rc == 0
    res = xsb("upload", "hello", str(path))
    assert res.rc == 1 and "-EEXIST" in one_line_error(res) and "Nothing was loaded" in res.err

    res = xsb("upload", "foreign", str(make_payload("foreign", against=other_hv)))
    assert res.rc == 1 and "-EINVAL" in one_line_error(res) and "xsbuild check" in res.err

    res = xsb("upload", "x", str(tmp_path / "missing.livepatch"))
    assert res.rc == 2 and "cannot read" in one_line_error(res)
    res = xsb("upload", "n" * 128, str(path))
    assert res.rc == 2 and "at most 127" in one_line_error(res)


def test_upload_checks_with_the_running_release(xsb, make_payload: PayloadFactory,  # noqa: F811
                                                sim_version: str) -> None:
    """upload reads the running release (XENVER) and checks the payload with its loader rules
    before UPLOAD: a read-only .livepatch.funcs would crash 4.18.0 at APPLY (spec §1.5), so it
    is refused there, naming the release, and taken by every other simulated release."""
    path = make_payload("ro_funcs", funcs_flags="alloc,readonly")
    res = xsb("upload", "ro", str(path))
    if sim_version == "4.18.0":
        line = one_line_error(res)
        assert res.rc == 1 and "would be rejected by Xen's loader (Xen 4.18.0)" in line, line
        assert ".livepatch.funcs is read-only" in line and "Nothing was uploaded" in line
        assert xsb("list", "--json").json()["payloads"] == []
    else:
        assert res.rc == 0, res.err


def test_force_needs_4_19(xsb, make_payload: PayloadFactory,  # noqa: F811
                          sim_version: str) -> None:
    """LIVEPATCH_FLAG_FORCE exists from 4.19 (spec §4.2): older releases get a one-line refusal
    before any UPLOAD (exit 2), newer ones take the payload."""
    path = make_payload("hello")
    res = xsb("upload", "hello", str(path), "--force", "--json")
    if XenVersion.parse(sim_version) < XenVersion(4, 19, 0):
        line = one_line_error(res)
        assert res.rc == 2 and f"this hypervisor is Xen {sim_version}" in line
        assert "--force needs Xen 4.19 or later" in line and "Nothing was uploaded" in line
        assert xsb("list", "--json").json()["payloads"] == []
        res = xsb("load", str(path), "--force")
        assert res.rc == 2 and "--force needs Xen 4.19" in one_line_error(res)
    else:
        assert res.rc == 0 and res.json()["forced"] is True
        assert xsb("load", str(make_payload("forced_load")), "--force").rc == 0


def test_list_pages_through_many_names(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    """LIST with several payloads: 0x15 sizes from the probe, 0x16 sizes IN (-ENOBUFS)."""
    names = [f"p{i}-{'x' * 60}" for i in range(5)]
    path = make_payload("hello")
    assert xsb("upload", names[0], str(path)).rc == 0
    for i, name in enumerate(names[1:], 1):
        # Distinct code, so distinct build-ids: ld's build-id does not hash symbol names.
        source = HELLO_SOURCE.replace("Hello World", f"Hello {i}")
        assert xsb("upload", name, str(make_payload(f"many{i}", source=source))).rc == 0
    assert [p["name"] for p in xsb("list", "--json").json()["payloads"]] == names


def test_apply_unknown_payload(xsb) -> None:
    res = xsb("apply", "ghost")
    assert res.rc == 1 and "ENOENT" in one_line_error(res) and "xsbuild list" in res.err
    res = xsb("apply", "ghost", "--json")
    assert res.rc == 1 and res.json()["errno"] == "ENOENT" and res.json()["exit_code"] == 1


def test_busy_host_exit_4_then_retries_succeed(xsb,
                                               make_payload: PayloadFactory) -> None:  # noqa: F811
    xsb("upload", "hello", str(make_payload("hello")))
    slow = {"XSBUILD_SIM_CPU_DELAYS": "0,5ms"}
    res = xsb("apply", "hello", "--timeout", "1ms", env=slow)
    line = one_line_error(res)
    assert res.rc == 4 and "rc -EBUSY" in line and "nothing was changed" in line
    assert "--retries" in line and "hello is now CHECKED" in line

    res = xsb("apply", "hello", "--timeout", "10ms", "--retries", "5", "--json", env=slow)
    assert res.rc == 0
    attempts = res.json()["attempts"]
    assert [a["timeout_ns"] for a in attempts] == [1_000_000, 1_584_893, 2_511_886, 3_981_072,
                                                   6_309_573]
    assert max(a["timeout_ns"] for a in attempts) <= 10_000_000


def test_stuck_action_exit_4(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    xsb("upload", "hello", str(make_payload("hello")))
    res = xsb("apply", "hello", "--wait", "0.05", env={"XSBUILD_SIM_POLLS": "-1"})
    assert res.rc == 4 and "still pending" in one_line_error(res)
    res = xsb("revert", "hello", env={"XSBUILD_SIM_POLLS": "-1"})
    assert res.rc == 4 and "already in progress" in one_line_error(res)
    assert xsb("apply", "hello").out.count("APPLIED") == 1  # the host got going again


def test_stacking_and_nodeps(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    a, b = stacked(make_payload)
    xsb("upload", "a", str(a))
    xsb("upload", "b", str(b))
    res = xsb("apply", "b")
    assert res.rc == 1 and "--nodeps" in one_line_error(res)
    assert xsb("apply", "b", "--nodeps").rc == 0
    assert xsb("revert", "b").rc == 0
    assert xsb("apply", "a").rc == 0 and xsb("apply", "b").rc == 0
    res = xsb("revert", "a")
    assert res.rc == 4 and "most recently applied" in one_line_error(res)
    rows = {p["name"]: p["state"] for p in xsb("list", "--json").json()["payloads"]}
    assert rows == {"a": "APPLIED", "b": "APPLIED"}


def test_replace_and_its_veto(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    a, b = stacked(make_payload)
    for name, path in (("a", a), ("b", b), ("r", make_payload("replacement"))):
        assert xsb("upload", name, str(path)).rc == 0
    xsb("apply", "a")
    xsb("apply", "b")
    res = xsb("replace", "r")
    assert res.rc == 0 and "Replacing all live patches with r... completed" in res.out
    rows = {p["name"]: p["state"] for p in xsb("list", "--json").json()["payloads"]}
    assert rows == {"a": "CHECKED", "b": "CHECKED", "r": "APPLIED"}

    hooked = make_payload("hooked", hooks={"preapply": ["lp_preapply"]},
                          extra_sources={"livepatch/hook_impl.c": HOOK_IMPL})
    xsb("upload", "h", str(hooked))
    res = xsb("replace", "h")
    assert res.rc == 1 and "-EOPNOTSUPP" in one_line_error(res) and "veto" in res.err


def test_load_and_rollback(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    a, b = stacked(make_payload)
    res = xsb("load", str(b))
    line = one_line_error(res)
    assert res.rc == 1 and "load stack_b" in line and "was unloaded again" in line
    assert xsb("list", "--json").json()["payloads"] == []
    data = xsb("load", str(a), "--json").json()
    assert data["upload"]["name"] == "stack_a" and data["apply"]["state_after"] == "APPLIED"
    res = xsb("load", str(b), "--name", "second")
    assert res.rc == 0 and "Applying second... completed" in res.out


def test_list_shows_errors_and_metadata(xsb, make_payload: PayloadFactory) -> None:  # noqa: F811
    xsb("upload", "m", str(make_payload("meta", modinfo="LIVEPATCH_RULEZ")))
    xsb("apply", "m", "--timeout", "1ms", env={"XSBUILD_SIM_CPU_DELAYS": "0,2ms"})
    row = xsb("list").out.splitlines()[2]
    assert "| CHECKED (16, Device or resource busy)    | " in row  # as xen-livepatch prints
    assert row.endswith("LIVEPATCH_RULEZ")
    entry = xsb("list", "--json").json()["payloads"][0]
    assert entry["rc"] == -16 and entry["rc_name"] == "EBUSY"
    assert entry["metadata"] == ["LIVEPATCH_RULEZ"]


@pytest.mark.parametrize("bad", [["--timeout", "soon"], ["--timeout", "5s"],
                                 ["--timeout", "0"], ["--retries", "-1"]])
def test_bad_options_are_usage_errors(xsb, bad: list[str]) -> None:
    assert xsb("apply", "x", *bad).rc == 2


def test_no_hypervisor_and_no_simulator(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    if privcmd.privcmd_available():
        pytest.skip("this machine has /dev/xen/privcmd")
    monkeypatch.delenv("XSBUILD_SIM_STATE", raising=False)
    monkeypatch.delenv("XSBUILD_BACKEND", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["list"])
    assert exc.value.code == 2
    assert "--backend sim" in capsys.readouterr().err


def test_help_teaches(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("upload", "apply", "revert", "replace", "unload", "list", "load"):
        with pytest.raises(SystemExit) as exc:
            main([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        assert "--backend" in text and "--json" in text and "Exit codes" in text
        if command in ("apply", "revert", "replace", "load"):
            assert "--retries" in text and "--timeout" in text


# ------------------------------------------------------------------------------------------------
# The installed entry point, in real processes


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60)


def test_processes_share_the_simulator_state(tmp_path: Path, hv: Image,  # noqa: F811
                                             make_payload: PayloadFactory) -> None:  # noqa: F811
    env = {"XSBUILD_SIM_STATE": str(tmp_path / "s.json"), "XSBUILD_BACKEND": "sim"}
    first = _run(["upload", "hello", str(make_payload("hello")), "--sim-xen-syms",
                  str(hv.path)], env)
    assert first.returncode == 0, first.stderr
    busy = _run(["apply", "hello", "--timeout", "1ms"],
                {**env, "XSBUILD_SIM_CPU_DELAYS": "0,3ms"})
    assert busy.returncode == 4 and "Traceback" not in busy.stderr
    done = _run(["apply", "hello"], env)
    assert done.returncode == 0, done.stderr
    listing = _run(["list", "--json"], env)
    assert json.loads(listing.stdout)["payloads"][0]["state"] == "APPLIED"
