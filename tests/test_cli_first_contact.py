"""Issue 13: a new user's first contact with the command line, point by point.

Every test runs the real command line (``xsbuild.cli.main``, the real error handler and exit
codes) on real gcc-built objects and payloads, and the apply commands on the simulator.  The
README's own first line runs, literally, in a clean copy of the repository (marker ``slow``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.image import Image, build_image
from tests.support.image import read_build_id as image_build_id
from tests.support.toolchain import Toolchain
from tests.test_apply_sim import (  # noqa: F401 - fixtures shared with the apply tests
    PayloadFactory,
    _no_real_hypercalls,
    hv,
    make_payload,
)
from tests.test_build import built_tree_master, cli_build, make_patch, replace_in  # noqa: F401
from tests.test_core import ORIG, UNIT, Built, built  # noqa: F401
from xsbuild.cli import main

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "docs" / "json-schema"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> dict:
        return json.loads(self.out)

    def one_line(self) -> str:
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith("xsbuild: error: "), self.err
        return lines[0]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """``cli("diff", a, b)`` runs the command line in-process; returns a Result."""
    for var in ("XSBUILD_SIM_CPU_DELAYS", "XSBUILD_SIM_POLLS", "XSBUILD_SIM_INTERFACE",
                "XSBUILD_BACKEND", "XSBUILD_TRACEBACK", "XSBUILD_SIM_STATE"):
        monkeypatch.delenv(var, raising=False)

    def call(*args: str | Path, env: dict[str, str] | None = None) -> Result:
        with monkeypatch.context() as m:
            for key, value in (env or {}).items():
                m.setenv(key, value)
            try:
                main([str(a) for a in args])
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else 1
            else:
                rc = 0
        captured = capsys.readouterr()
        return Result(rc, captured.out, captured.err)

    return call


@pytest.fixture
def sim(cli, tmp_path: Path, hv: Image):  # noqa: F811
    """The apply commands on a fresh simulator of ``hv``."""
    state = tmp_path / "sim.state"

    def call(*args: str | Path, env: dict[str, str] | None = None) -> Result:
        extra = ["--backend", "sim", "--sim-state", str(state)]
        if not state.exists():
            extra += ["--sim-xen-syms", str(hv.path)]
        return cli(*args, *extra, env=env)

    return call


@pytest.fixture
def work(built: Built, tmp_path: Path) -> dict[str, Path]:  # noqa: F811
    """Private copies of the core objects, the hypervisor and a payload."""
    files = {"orig": built.orig, "patched": built.patched, "xen-syms": built.image.path,
             "payload": built.payload}
    out = {}
    for key, src in files.items():
        out[key] = tmp_path / f"in-{key}{src.suffix}"
        shutil.copyfile(src, out[key])
    return out


def bad_elves(built: Built, tmp: Path) -> dict[str, Path]:  # noqa: F811
    """Not an ELF, a truncated payload, an i386 and an AArch64 object."""
    text = tmp / "text.txt"
    text.write_text("hello\n")
    trunc = tmp / "trunc.livepatch"
    trunc.write_bytes(built.payload.read_bytes()[:300])
    out = {"not_elf": text, "truncated": trunc}
    for case, machine in (("i386", 3), ("aarch64", 183)):
        data = bytearray(built.payload.read_bytes())
        struct.pack_into("<H", data, 18, machine)
        out[case] = tmp / f"{case}.livepatch"
        out[case].write_bytes(bytes(data))
    return out


# ------------------------------------------------------------------------------------------------
# 1. The README's first command, on a Python that refuses system-wide installs (PEP 668)


def readme_first_line() -> str:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block, "README has no sh block"
    return block.group(1).strip().splitlines()[0]


def test_readme_first_line_uses_a_venv_and_names_system_packages() -> None:
    line = readme_first_line()
    assert "python3 -m venv .venv" in line and ".venv/bin/pip install" in line, line
    assert "pip install" not in line.replace(".venv/bin/pip install", ""), line
    text = (REPO / "README.md").read_text()
    for package in ("python3-venv", "gcc", "binutils"):
        assert package in text


@pytest.mark.slow
def test_readme_first_line_runs_in_a_clean_copy(tmp_path: Path) -> None:
    """PIP_REQUIRE_VIRTUALENV makes pip refuse system installs as Debian's PEP 668 marker does."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    copy = tmp_path / "clone"
    for name in files.stdout.decode().split("\0"):
        if name and (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_REQUIRE_VIRTUALENV"] = "1"
    proc = subprocess.run(["bash", "-ec", readme_first_line()], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "reverting restores the original code" in proc.stdout


@pytest.mark.slow
def test_debian_version_without_a_source_package_is_one_line(cli, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Debian trixie's 4.20.4+63 ships binaries whose source package bookworm's apt sources
    (deb-src, as .ci/xen-e2e.sh sets them) cannot fetch: --debian says so before downloading
    anything, exit 2, and points at --srcdir/--base; the cache gets no entry for it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    patch = tmp_path / "fix.patch"
    patch.write_text("--- a/xen/common/version.c\n+++ b/xen/common/version.c\n"
                     "@@ -1 +1 @@\n-a\n+b\n")
    res = cli("build", "--debian", "4.20.4+63-g7abfd2bce2-0+deb13u1", "--patch", patch,
              "-o", tmp_path / "x.livepatch")
    line = res.err.strip()
    assert res.rc == 2 and len(line.splitlines()) == 1, res.err
    assert "xen 4.20.4+63-g7abfd2bce2-0+deb13u1 source package cannot be fetched" in line, line
    assert "--srcdir" in line and not list((tmp_path / "cache").rglob("*.deb"))
    assert not (tmp_path / "cache" / "xsbuild" / "debian").exists(), \
        list((tmp_path / "cache").rglob("*"))


# ------------------------------------------------------------------------------------------------
# 2, 3. Outputs: a missing folder is bad usage; an output that is an input is refused


def _writers(w: dict[str, Path], out: Path) -> dict[str, list[str | Path]]:
    return {
        "diff": ["diff", w["orig"], w["patched"], "-o", out],
        "link": ["link", w["diffobj"], "-o", out, "--xen-syms", w["xen-syms"]],
        "inspect": ["inspect", w["payload"], "-o", out],
        "explain": ["explain", w["orig"], w["patched"], "-o", out],
        "build": ["build", "--srcdir", w["tree"], "--patch", w["patch"], "--xen-syms",
                  w["xen-syms"], "-o", out],
        "demo": ["demo", "-w", out],
    }


@pytest.fixture
def writers_input(cli, work: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    w = dict(work)
    w["diffobj"] = tmp_path / "in-diff.o"
    assert cli("diff", w["orig"], w["patched"], "-o", w["diffobj"]).rc == 0
    w["tree"] = tmp_path / "tree"
    (w["tree"] / "xen").mkdir(parents=True)
    (w["tree"] / "xen" / "Rules.mk").write_text("")
    w["patch"] = tmp_path / "fix.patch"
    w["patch"].write_text("--- a/xen/x.c\n+++ b/xen/x.c\n")
    return w


@pytest.mark.parametrize("command", ["diff", "link", "inspect", "explain", "build", "demo"])
def test_output_into_a_missing_directory_is_usage(cli, writers_input: dict[str, Path],
                                                  tmp_path: Path, command: str) -> None:
    out = tmp_path / "nonexistent" / "dir" / "x.out"
    res = cli(*_writers(writers_input, out)[command])
    assert res.rc == 2 and "does not exist" in res.one_line()
    assert not (tmp_path / "nonexistent").exists()


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("command,victim", [
    ("diff", "orig"), ("diff", "patched"), ("link", "diffobj"), ("link", "xen-syms"),
    ("inspect", "payload"), ("explain", "orig"), ("build", "xen-syms"), ("build", "patch")])
def test_output_that_is_an_input_is_refused(cli, writers_input: dict[str, Path], tmp_path: Path,
                                            command: str, victim: str, how: str) -> None:
    target = writers_input[victim]
    before = target.read_bytes()
    out = target
    if how == "symlink":
        out = tmp_path / "alias"
        out.symlink_to(target)
    elif how == "hardlink":
        out = tmp_path / "alias"
        os.link(target, out)
    res = cli(*_writers(writers_input, out)[command])
    assert res.rc == 2 and "is an input" in res.one_line()
    assert target.read_bytes() == before


# ------------------------------------------------------------------------------------------------
# 4. Build-ids are checked where given; check names a dependency nothing provides


@pytest.mark.parametrize("option", ["--depends", "--xen-depends"])
@pytest.mark.parametrize("value", ["abcd", "xyz", "abc", ""])
def test_link_refuses_a_bad_build_id(cli, writers_input: dict[str, Path], tmp_path: Path,
                                     option: str, value: str) -> None:
    out = tmp_path / "x.livepatch"
    res = cli("link", writers_input["diffobj"], "-o", out, "--xen-syms",
              writers_input["xen-syms"], option, value)
    assert res.rc == 2 and "build-id" in res.one_line()
    assert not out.exists()


def test_check_reports_a_dependency_nothing_provides(cli, writers_input: dict[str, Path],
                                                     tmp_path: Path) -> None:
    w = writers_input
    first = tmp_path / "first.livepatch"
    assert cli("link", w["diffobj"], "-o", first, "--xen-syms", w["xen-syms"]).rc == 0
    first_id = image_build_id(first)
    second = tmp_path / "second.livepatch"
    assert cli("link", w["diffobj"], "-o", second, "--xen-syms", w["xen-syms"],
               "--depends", first_id, "--name", "second").rc == 0
    orphan = tmp_path / "orphan.livepatch"
    assert cli("link", w["diffobj"], "-o", orphan, "--xen-syms", w["xen-syms"],
               "--depends", "11" * 20).rc == 0

    res = cli("check", orphan, "--xen-syms", w["xen-syms"])
    assert res.rc == 1 and "depends" in res.out and "11" * 20 in res.out
    res = cli("check", second, "--xen-syms", w["xen-syms"])
    assert res.rc == 1 and first_id in res.out
    res = cli("check", second, "--xen-syms", w["xen-syms"], "--payload", first)
    assert res.rc == 0 and "OK" in res.out, res.out
    assert cli("check", first, "--xen-syms", w["xen-syms"]).rc == 0


# ------------------------------------------------------------------------------------------------
# 5, 6. One exit-code rule for bad input, and the offline check before any hypercall


def _bad_input_argv(command: str, bad: Path, w: dict[str, Path]) -> list[str | Path]:
    return {
        "diff": ["diff", bad, w["patched"]],
        "explain": ["explain", bad, w["patched"]],
        "link": ["link", bad, "-o", w["tmp"] / "x.livepatch", "--xen-syms", w["xen-syms"]],
        "check": ["check", bad],
        "check-xs": ["check", w["payload"], "--xen-syms", bad],
        "inspect": ["inspect", bad],
        "upload": ["upload", "x", bad, "--backend", "sim", "--sim-state", w["tmp"] / "s",
                   "--sim-xen-syms", w["xen-syms"]],
        "load": ["load", bad, "--backend", "sim", "--sim-state", w["tmp"] / "s",
                 "--sim-xen-syms", w["xen-syms"]],
    }[command]


_MESSAGES = {"not_elf": "not an ELF file", "truncated": "truncated", "i386": "i386",
             "aarch64": "AArch64"}


@pytest.mark.parametrize("case", sorted(_MESSAGES))
@pytest.mark.parametrize("command", ["diff", "explain", "link", "check", "check-xs", "inspect",
                                     "upload", "load"])
def test_bad_input_exits_2_with_the_reason(cli, built: Built, work: dict[str, Path],  # noqa: F811
                                           tmp_path: Path, command: str, case: str) -> None:
    if command in ("diff", "explain", "link") and case == "truncated":
        bad = tmp_path / "trunc.o"
        bad.write_bytes(built.orig.read_bytes()[:300])
    else:
        bad = bad_elves(built, tmp_path)[case]
    res = cli(*_bad_input_argv(command, bad, {**work, "tmp": tmp_path}))
    line = res.one_line()
    assert res.rc == 2, line
    assert _MESSAGES[case] in line
    assert "hypercall" not in line


def test_upload_runs_the_offline_check_before_any_hypercall(
        sim, cli, make_payload: PayloadFactory, tmp_path: Path) -> None:  # noqa: F811
    no_notes = make_payload("nodepends_cli", omit=frozenset({".livepatch.depends"}))
    res = sim("upload", "x", no_notes)
    line = res.one_line()
    assert res.rc == 1 and "-EINVAL" in line and "depends" in line
    assert "hypercall" not in line and "nothing was uploaded" in line.lower()
    # no simulator needed: the check runs before the backend is opened
    text = tmp_path / "t.txt"
    text.write_text("x")
    res = cli("load", text, "--backend", "privcmd")
    assert res.rc == 2 and "not an ELF file" in res.one_line()


# ------------------------------------------------------------------------------------------------
# 7. The simulator's state file


def test_sim_state_in_a_missing_directory_is_usage(cli, hv: Image,  # noqa: F811
                                                   tmp_path: Path) -> None:
    state = tmp_path / "nonexistent" / "s.state"
    res = cli("list", "--backend", "sim", "--sim-state", state, "--sim-xen-syms", hv.path)
    assert res.rc == 2 and "does not exist" in res.one_line()
    assert not state.parent.exists()


def test_sim_leaves_no_lock_file_and_help_is_accurate(cli, hv: Image,  # noqa: F811
                                                      tmp_path: Path) -> None:
    state = tmp_path / "s.state"
    res = cli("list", "--backend", "sim", "--sim-state", state)
    assert res.rc == 2 and "--sim-xen-syms" in res.one_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert cli("list", "--backend", "sim", "--sim-state", state, "--sim-xen-syms",
               hv.path).rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.state"]
    help_text = " ".join(cli("list", "--help").out.split())
    assert "created on first use" not in help_text
    assert "created by the first command given --sim-xen-syms" in help_text


# ------------------------------------------------------------------------------------------------
# 8. Help: every command has an example, exit statuses, the backends; usage errors are one line


ALL_COMMANDS = ["diff", "link", "check", "build", "inspect", "explain", "upload", "apply",
                "revert", "replace", "unload", "list", "load", "demo"]


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_help_has_an_example_and_exit_statuses(cli, command: str) -> None:
    res = cli(command, "--help")
    assert res.rc == 0
    text = res.out
    assert re.search(r"Examples?:\n\s+xsbuild " + command, text), text
    if command != "demo":
        assert re.search(r"Exit (codes|status)", text), text
    if "--backend" in text:
        assert "sim      a simulated Xen kept in --sim-state FILE (4.17.5 unless" in text, text


@pytest.mark.parametrize("argv", [["diff"], ["diff", "--bogus", "a", "b"], ["nosuchcommand"],
                                  ["apply", "x", "--timeout"], ["check", "/nonexistent"]])
def test_click_usage_errors_are_one_line(cli, argv: list[str]) -> None:
    res = cli(*argv)
    assert res.rc == 2
    where = "xsbuild --help" if argv[0] == "nosuchcommand" else f"xsbuild {argv[0]} --help"
    assert where in res.one_line()


# ------------------------------------------------------------------------------------------------
# 9. Leftovers and messages


def test_build_failure_says_where_its_log_is(cli, writers_input: dict[str, Path],
                                             tmp_path: Path) -> None:
    out = tmp_path / "b.livepatch"
    res = cli(*_writers(writers_input, out)["build"], "--quiet",
              env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    line = res.one_line()  # --quiet: no progress lines, only the error
    assert res.rc != 0 and f"log: {out}.log" in line
    assert (tmp_path / "b.livepatch.log").is_file() and not out.exists()


def test_build_missing_srcdir_does_not_exist(cli, writers_input: dict[str, Path],
                                             tmp_path: Path) -> None:
    res = cli("build", "--srcdir", tmp_path / "nosuchdir", "--patch", writers_input["patch"],
              "--xen-syms", writers_input["xen-syms"], "-o", tmp_path / "x.livepatch")
    assert res.rc == 2 and "does not exist" in res.one_line()


def test_upload_eexist_says_what_clashed(sim, make_payload: PayloadFactory) -> None:  # noqa: F811
    path = make_payload("hello")
    assert sim("upload", "hello", path).rc == 0
    res = sim("upload", "hello", path)
    assert res.rc == 1 and "a payload named hello is already loaded" in res.one_line()
    res = sim("upload", "other", path)
    line = res.one_line()
    assert res.rc == 1 and "no payload named other" in line and "build-id" in line


def test_empty_names_are_refused(cli, sim, writers_input: dict[str, Path],
                                 make_payload: PayloadFactory, tmp_path: Path) -> None:  # noqa: F811
    res = cli("link", writers_input["diffobj"], "-o", tmp_path / "n.livepatch", "--xen-syms",
              writers_input["xen-syms"], "--name", "")
    assert res.rc == 2 and "--name" in res.one_line()
    assert not (tmp_path / "n.livepatch").exists()
    res = sim("load", make_payload("hello"), "--name", "")
    assert res.rc == 2 and "--name" in res.one_line()


def test_unload_says_unloaded(sim, make_payload: PayloadFactory) -> None:  # noqa: F811
    assert sim("upload", "hello", make_payload("hello")).rc == 0
    res = sim("unload", "hello")
    assert res.rc == 0 and "(unloaded)" not in res.out
    assert "Unloading hello... completed: hello is unloaded." in res.out


# ------------------------------------------------------------------------------------------------
# 10. XSBUILD_SKIP_XEN=1 as root: no apt at all


def test_ci_run_skip_xen_does_not_touch_apt(tmp_path: Path) -> None:
    shims = tmp_path / "bin"
    shims.mkdir()
    log = tmp_path / "calls"
    for tool, body in (("id", 'echo 0'), ("python3", "exit 0"), ("ruff", "exit 0"),
                       ("apt-get", "exit 0"), ("bash", "exit 0")):
        (shims / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n{body}\n')
        (shims / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "XSBUILD_SKIP_XEN": "1"}
    proc = subprocess.run([shutil.which("bash", path="/usr/bin:/bin"), str(REPO / ".ci/run")],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text()
    assert "xen-e2e" not in calls and "apt-get" not in calls, calls
    assert "pytest" in calls  # the fast suite still runs
    proc = subprocess.run([shutil.which("bash", path="/usr/bin:/bin"), str(REPO / ".ci/run")],
                          env={**env, "XSBUILD_SKIP_XEN": ""}, capture_output=True, text=True,
                          timeout=60)
    assert "xen-e2e" in log.read_text()  # without the flag, root prepares the machine


# ------------------------------------------------------------------------------------------------
# 11. Every --json output has a schema; failures print an error object on stdout


def _validate(doc: dict, name: str) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def test_json_of_diff_link_check_validates(cli, writers_input: dict[str, Path],
                                           tmp_path: Path) -> None:
    w = writers_input
    res = cli("diff", w["orig"], w["patched"], "--json")
    assert res.rc == 0
    _validate(res.json(), "xsbuild.diff-1")
    out = tmp_path / "j.livepatch"
    res = cli("link", w["diffobj"], "-o", out, "--xen-syms", w["xen-syms"], "--json")
    _validate(res.json(), "xsbuild.link-1")
    res = cli("check", out, "--xen-syms", w["xen-syms"], "--json")
    _validate(res.json(), "xsbuild.check-1")
    res = cli("check", out, "--json")
    _validate(res.json(), "xsbuild.check-1")


def test_json_of_apply_commands_validates(sim, make_payload: PayloadFactory) -> None:  # noqa: F811
    path = make_payload("hello")
    docs = [("upload", sim("upload", "hello", path, "--json")),
            ("action", sim("apply", "hello", "--json")),
            ("list", sim("list", "--json")),
            ("action", sim("revert", "hello", "--json")),
            ("action", sim("unload", "hello", "--json")),
            ("load", sim("load", path, "--json"))]
    for kind, res in docs:
        assert res.rc == 0, res.err
        _validate(res.json(), f"xsbuild.{kind}-1")


@pytest.mark.parametrize("command", ["diff", "link", "check", "build", "upload", "apply",
                                     "list", "load"])
def test_json_failure_prints_an_error_object(cli, writers_input: dict[str, Path],
                                             tmp_path: Path, command: str) -> None:
    w = writers_input
    text = tmp_path / "t.txt"
    text.write_text("x")
    sim_args = ["--backend", "sim", "--sim-state", tmp_path / "s", "--sim-xen-syms",
                w["xen-syms"]]
    argv = {"diff": ["diff", text, w["patched"]],
            "link": ["link", text, "-o", tmp_path / "x", "--xen-syms", w["xen-syms"]],
            "check": ["check", text],
            "build": ["build", "--srcdir", tmp_path / "none", "--patch", w["patch"],
                      "--xen-syms", w["xen-syms"], "-o", tmp_path / "x"],
            "upload": ["upload", "x", text, *sim_args],
            "apply": ["apply", "ghost", *sim_args],
            "list": ["list", "--backend", "sim", "--sim-state", tmp_path / "none" / "s"],
            "load": ["load", text, *sim_args]}[command]
    res = cli(*argv, "--json")
    assert res.rc in (1, 2)
    doc = res.json()
    _validate(doc, "xsbuild.error-1")
    assert doc["exit_code"] == res.rc and doc["error"] in res.err


# ------------------------------------------------------------------------------------------------
# 12. Shell completion is documented and works; --quiet and --verbose


def test_shell_completion_documented_and_works() -> None:
    text = (REPO / "README.md").read_text()
    assert "_XSBUILD_COMPLETE=bash_source xsbuild" in text
    proc = subprocess.run([sys.executable, "-m", "xsbuild"], capture_output=True, text=True,
                          env={**os.environ, "_XSBUILD_COMPLETE": "bash_source"}, timeout=60)
    assert proc.returncode == 0 and "complete -o nosort -F" in proc.stdout, proc.stderr


def test_quiet_keeps_only_errors_and_the_result(cli, writers_input: dict[str, Path],
                                                tmp_path: Path) -> None:
    w = writers_input
    loud = cli("diff", w["orig"], w["patched"])
    quiet = cli("diff", w["orig"], w["patched"], "--quiet")
    assert quiet.rc == loud.rc == 0 and loud.out and quiet.out == "" and quiet.err == ""
    out = tmp_path / "q.livepatch"
    quiet = cli("link", w["diffobj"], "-o", out, "--xen-syms", w["xen-syms"], "-q")
    assert quiet.rc == 0 and quiet.out.strip().splitlines() == [quiet.out.strip()]
    assert "wrote" in quiet.out and "patches" not in quiet.out


# ------------------------------------------------------------------------------------------------
# 13. Retries grow geometrically from --timeout-start to --timeout, and --verbose shows it


def test_retries_reach_the_timeout_with_late_cpus(sim, make_payload: PayloadFactory) -> None:  # noqa: F811
    assert sim("upload", "hello", make_payload("hello")).rc == 0
    late = {"XSBUILD_SIM_CPU_DELAYS": "0,90ms"}
    res = sim("apply", "hello", "--retries", "6", "--timeout-start", "1ns", "--timeout",
              "100ms", "--json", "--verbose", env=late)
    assert res.rc == 0, res.err
    timeouts = [a["timeout_ns"] for a in res.json()["attempts"]]
    assert len(timeouts) == 7 and timeouts[0] == 1 and timeouts[-1] == 100_000_000
    geometric = [1e8 ** (i / 6) for i in range(7)]
    assert all(abs(t - g) <= 0.5 + 1e-9 * g for t, g in zip(timeouts, geometric, strict=True))
    assert "1 ns, " in res.err and "100 ms" in res.err and "7 attempts" in res.err


def test_retry_schedule_without_retries_is_the_timeout() -> None:
    from xsbuild.apply import ActionOptions

    assert ActionOptions(timeout_ns=30_000_000).timeouts() == [30_000_000]
    assert ActionOptions(timeout_ns=8, retries=3, timeout_start_ns=1).timeouts() == [1, 2, 4, 8]
    assert ActionOptions(timeout_ns=5, retries=2, timeout_start_ns=10).timeouts() == [5, 5, 5]


# ------------------------------------------------------------------------------------------------
# 14. The review report's old side names strings from xen-syms' data sections


def test_inspect_old_side_names_string_literals(cli, toolchain: Toolchain,
                                                tmp_path: Path) -> None:
    source = ORIG.replace('"many"', '"plenty-of-them"')
    image = build_image(toolchain, {UNIT: source}, tmp_path / "xen-syms")
    orig = toolchain.compile_source(source, UNIT)
    patched = toolchain.compile_source(source.replace('"plenty-of-them"', '"lots-now"'), UNIT)
    diffobj, payload = tmp_path / "d.o", tmp_path / "p.livepatch"
    assert cli("diff", orig, patched, "-o", diffobj).rc == 0
    assert cli("link", diffobj, "-o", payload, "--xen-syms", image.path).rc == 0
    res = cli("inspect", payload, "--xen-syms", image.path)
    assert res.rc == 0
    old_lines = [line for line in res.out.splitlines() if line.lstrip().startswith("-")]
    assert any('"plenty-of-them"' in line for line in old_lines), res.out
    assert any('"lots-now"' in line for line in res.out.splitlines())


def test_json_of_build_validates(tmp_path: Path, built_tree_master: Path) -> None:  # noqa: F811
    top = tmp_path / "tree"
    shutil.copytree(built_tree_master, top, symlinks=True)
    patch = make_patch(top, {"xen/common/beta.c": replace_in(top, "xen/common/beta.c", "- 1",
                                                             "- 2")}, tmp_path / "b.patch")
    out = tmp_path / "out.livepatch"
    run = cli_build(top, patch, out, "--json", "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""  # --quiet: no progress
    doc = json.loads(run.stdout)
    _validate(doc, "xsbuild.build-1")
    _validate(doc["link"], "xsbuild.link-1")
    for diff in doc["diffs"].values():
        _validate(diff, "xsbuild.diff-1")
    data = replace_in(top, "xen/common/alpha.c", "alpha_counter = 5", "alpha_counter = 6")
    refused = make_patch(top, {"xen/common/alpha.c": data}, tmp_path / "d.patch")
    run = cli_build(top, refused, tmp_path / "r.livepatch", "--json", "--quiet")
    assert run.returncode == 1
    doc = json.loads(run.stdout)
    _validate(doc, "xsbuild.error-1")
    assert doc["refused"] and doc["status"] == "UnsupportedChangeError"
