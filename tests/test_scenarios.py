"""The behavioural scenario suite for the core compiler (``xsbuild diff`` / ``link`` / ``check``).

Each directory of ``fixtures/scenarios/`` holds ``fix.patch`` (against ``fixtures/xen/``) and
``scenario.toml``.  For every scenario this test:

1. compiles the original and patched fixture sources with Xen's flags (cached by content);
2. runs ``xsbuild diff ORIG.o PATCHED.o -o OUT.o --json`` per changed file and checks the exit
   code, the changed/new lists, the refusal message, and that nothing is left behind on refusal;
3. links the diff objects with ``xsbuild link --xen-syms IMAGE`` and checks the payload with
   ``xsbuild check``, real ``readelf -SrsW`` (no warnings) and ``ld -r``;
4. proves behaviour in child processes (xsbuild/sandbox/runner.py): after apply, every listed call
   returns what the PATCHED build returns; before and after revert, what the original returns.

scenario.toml::

    description = "..."
    endbr_patches = 1               # optional: functions patched after their ENDBR64
    [[object]]                      # one per file the patch touches
    file = "common/sched.c"
    exit = 0                        # 0 changed, 1 refused, 3 no change
    changed = ["sched_pick"]        # exact set of changed_functions[].name
    changed_optional = []           # names that may also be reported (e.g. a .cold sibling)
    new_functions = []              # exact set of new_functions[].name
    new_data = []                   # exact set of new_data[].name
    new_optional = []               # names that may also be in either new list
    refused = "regex"               # exit 1: searched in stderr + JSON refused reasons
    hooks = ["load"]                # each must occur in some reported hook
    diff_args = []                  # extra options for xsbuild diff (e.g. --new-static NAME)
    [link]                          # optional: the link must be refused instead
    exit = 1
    refused = "regex"               # searched in stderr
    [entries]                       # special-section entries the payload must carry
    ".altinstructions" = 1
    [[calls]]
    fn = "sched_pick"               # Xen name (path#name for statics)
    args = [1, 2]
    ret = "int"                     # int | uint | long | str
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.image import Image, build_image
from tests.support.toolchain import FIXTURES, Toolchain, readelf, run, section_sizes
from xsbuild import xen_abi as abi
from xsbuild.sandbox.runner import Call, behaviour_proof, plain_rounds

BASE = FIXTURES / "xen"
SCENARIOS = FIXTURES / "scenarios"
XSBUILD_TIMEOUT = 60

ENTRY_SIZES = {abi.SEC_ALTINSTRUCTIONS: abi.ALT_INSTR_SIZE,
               abi.SEC_EX_TABLE: abi.EX_TABLE_ENTRY_SIZE,
               **{name: abi.BUG_FRAME_SIZE for name in abi.BUG_FRAME_SECTIONS}}


# ----------------------------------------------------------------------------------------------
# Scenario model

@dataclass
class ObjectExpect:
    """What ``xsbuild diff`` must say about one changed file."""

    file: str
    exit: int
    changed: set[str] = field(default_factory=set)
    changed_optional: set[str] = field(default_factory=set)
    new_functions: set[str] = field(default_factory=set)
    new_data: set[str] = field(default_factory=set)
    new_optional: set[str] = field(default_factory=set)
    refused: str = ""
    hooks: list[str] = field(default_factory=list)
    diff_args: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    name: str
    description: str
    patch: Path
    objects: list[ObjectExpect]
    calls: list[Call]
    entries: dict[str, int]
    link_exit: int = 0
    link_refused: str = ""
    endbr_patches: int | None = None

    @property
    def links(self) -> bool:
        """Every diff succeeds and at least one finds a change: ``xsbuild link`` runs."""
        codes = {o.exit for o in self.objects}
        return 1 not in codes and 0 in codes

    @property
    def payload_expected(self) -> bool:
        return self.links and self.link_exit == 0


def _object_expect(raw: dict[str, Any]) -> ObjectExpect:
    sets = ("changed", "changed_optional", "new_functions", "new_data", "new_optional")
    return ObjectExpect(file=raw["file"], exit=raw["exit"], refused=raw.get("refused", ""),
                        hooks=raw.get("hooks", []), diff_args=raw.get("diff_args", []),
                        **{key: set(raw.get(key, [])) for key in sets})


def load_scenario(directory: Path) -> Scenario:
    data = tomllib.loads((directory / "scenario.toml").read_text())
    calls = [Call(c["fn"], tuple(c.get("args", [])), c.get("ret", "int"))
             for c in data.get("calls", [])]
    link = data.get("link", {})
    return Scenario(directory.name, data.get("description", ""), directory / "fix.patch",
                    [_object_expect(o) for o in data["object"]], calls,
                    dict(data.get("entries", {})), link.get("exit", 0), link.get("refused", ""),
                    data.get("endbr_patches"))


SCENARIO_DIRS = sorted(p for p in SCENARIOS.iterdir() if (p / "scenario.toml").exists())


# ----------------------------------------------------------------------------------------------
# Sources, objects, images

def base_sources() -> dict[str, str]:
    """``{path relative to fixtures/xen: text}`` of the fixture hypervisor."""
    return {str(p.relative_to(BASE)): p.read_text() for p in sorted(BASE.rglob("*.[cS]"))}


def patched_sources(patch: Path, work: Path) -> dict[str, str]:
    """Apply ``patch`` (-p1) to a copy of the base sources with real ``patch``."""
    tree = work / "src"
    shutil.copytree(BASE, tree)
    run(["patch", "-p1", "--quiet", "--no-backup-if-mismatch", "-d", str(tree), "-i",
         str(patch)])
    return {str(p.relative_to(tree)): p.read_text() for p in sorted(tree.rglob("*.[cS]"))}


@pytest.fixture(scope="session")
def orig_image(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Image:
    """The unpatched fixture hypervisor: the ``--xen-syms`` of every payload."""
    return build_image(toolchain, base_sources(), tmp_path_factory.mktemp("orig") / "xen-syms")


def xsbuild(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, timeout=XSBUILD_TIMEOUT, check=False)


@functools.cache
def missing_commands() -> list[str]:
    """The core-compiler commands this checkout does not have yet."""
    return [cmd for cmd in ("diff", "link", "check") if xsbuild(cmd, "--help").returncode != 0]


def require_commands(*names: str) -> None:
    missing = [n for n in names if n in missing_commands()]
    if missing:
        pytest.skip(f"xsbuild {'/'.join(missing)} not implemented yet")


# ----------------------------------------------------------------------------------------------
# Checks

def _local_symbols(obj: Path) -> set[str]:
    names = set()
    for line in readelf("-s", obj).splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[4] == "LOCAL" and parts[3] in ("FUNC", "OBJECT"):
            names.add(parts[7])
    return names


def _names(entries: list[dict[str, Any]]) -> set[str]:
    return {e["name"] for e in entries}


def check_changed(report: dict[str, Any], exp: ObjectExpect, patched: Path) -> list[str]:
    """Problems with a ``status: changed`` report (empty list: all good)."""
    problems = []
    changed = _names(report.get("changed_functions", []))
    if not exp.changed <= changed or changed - exp.changed - exp.changed_optional:
        problems.append(f"changed_functions {sorted(changed)}, expected {sorted(exp.changed)}"
                        f" (optional {sorted(exp.changed_optional)})")
    for key in ("new_functions", "new_data"):
        got = _names(report.get(key, [])) - exp.new_optional
        if got != getattr(exp, key):
            problems.append(f"{key} {sorted(got)}, expected {sorted(getattr(exp, key))}")
    locals_ = _local_symbols(patched)
    for entry in report.get("changed_functions", []):
        want = f"{exp.file}#{entry['name']}" if entry["name"] in locals_ else entry["name"]
        if entry.get("xen_name") != want:
            problems.append(f"xen_name of {entry['name']} is {entry.get('xen_name')!r}, "
                            f"expected {want!r}")
    for kind in exp.hooks:
        if not any(kind in h for h in report.get("hooks", [])):
            problems.append(f"hook {kind!r} not in {report.get('hooks')}")
    return problems


def run_diff(orig: Path, patched: Path, out: Path, exp: ObjectExpect) -> dict[str, Any] | None:
    """Run ``xsbuild diff --json`` and check it against ``exp``; the report or None."""
    proc = xsbuild("diff", orig, patched, "-o", out, "--json", *exp.diff_args)
    detail = f"{exp.file}: xsbuild diff exit {proc.returncode}\nstderr: {proc.stderr}"
    assert proc.returncode == exp.exit, f"{detail}\nstdout: {proc.stdout}"
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    if report is not None:
        assert report.get("schema") == "xsbuild.diff/1", report
    if exp.exit == 1:
        reasons = " ".join(" ".join(str(v) for v in r.values())
                           for r in (report or {}).get("refused", []))
        assert re.search(exp.refused, proc.stderr + reasons), \
            f"refusal does not match {exp.refused!r}: {detail} {reasons}"
    if exp.exit != 0:
        left = sorted(p.name for p in out.parent.iterdir())
        assert not left, f"{exp.file}: diff exit {exp.exit} left {left} in the output directory"
        return report
    assert report is not None and report.get("status") == "changed", detail
    problems = check_changed(report, exp, patched)
    assert not problems, f"{exp.file}:\n  " + "\n  ".join(problems)
    assert out.exists(), f"{exp.file}: exit 0 but no {out}"
    return report


def check_payload_tools(payload: Path, work: Path) -> None:
    """Real binutils accept the payload: readelf without warnings, ld -r relinks it, and every
    ``path#name`` local follows the FILE symbol of its own path, as readers attribute it."""
    current_file = None
    for line in readelf("-sW", payload).splitlines():
        parts = line.split()
        if len(parts) < 8 or parts[4] != "LOCAL":
            continue
        if parts[3] == "FILE":
            current_file = parts[7]
        elif parts[3] in ("FUNC", "OBJECT") and "#" in parts[7]:
            path = parts[7].split("#", 1)[0]
            assert path == current_file, f"{parts[7]} follows FILE {current_file}"
    run(["ld", "-melf_x86_64", "-r", "-o", str(work / "relinked.o"), str(payload)])


def check_entries(payload: Path, entries: dict[str, int]) -> None:
    sizes = section_sizes(payload)
    for section, count in entries.items():
        got = sizes.get(section, 0) // ENTRY_SIZES.get(section, 1)
        if section in abi.BUG_FRAME_SECTIONS[3:]:
            got //= 2  # assert frames are two frames each
        assert got == count, f"{section}: {got} entries in the payload, expected {count}"


# ----------------------------------------------------------------------------------------------
# The tests

@pytest.mark.parametrize("directory", SCENARIO_DIRS, ids=[d.name for d in SCENARIO_DIRS])
def test_scenario(directory: Path, toolchain: Toolchain, orig_image: Image,
                  tmp_path: Path) -> None:
    scenario = load_scenario(directory)
    patched = patched_sources(scenario.patch, tmp_path)
    base = base_sources()
    touched = {f for f in patched if patched[f] != base[f]}
    assert touched == {o.file for o in scenario.objects}, "scenario.toml lists other files"
    require_commands("diff")

    outputs = []
    for index, exp in enumerate(scenario.objects):
        orig_obj = toolchain.compile_source(base[exp.file], exp.file)
        patched_obj = toolchain.compile_source(patched[exp.file], exp.file)
        out = tmp_path / f"out{index}" / Path(exp.file).with_suffix(".o").name
        out.parent.mkdir()  # one empty directory per object: leftovers are easy to see
        run_diff(orig_obj, patched_obj, out, exp)
        if exp.exit == 0:
            outputs.append(out)
    if not scenario.links:
        return

    require_commands("link", "check")
    payload = tmp_path / f"{scenario.name}.livepatch"
    proc = xsbuild("link", *outputs, "-o", payload, "--xen-syms", orig_image.path)
    assert proc.returncode == scenario.link_exit, f"xsbuild link exit {proc.returncode}: " \
                                                  f"{proc.stderr}"
    if scenario.link_exit:
        assert re.search(scenario.link_refused, proc.stderr), proc.stderr
        assert not payload.exists(), "a refused link left its output behind"
        return
    proc = xsbuild("check", payload, "--xen-syms", orig_image.path)
    assert proc.returncode == 0, f"xsbuild check exit {proc.returncode}: {proc.stderr}"
    check_payload_tools(payload, tmp_path)
    check_entries(payload, scenario.entries)

    patched_image = build_image(toolchain, patched, tmp_path / "xen-syms.patched")
    proof = behaviour_proof(orig_image.path, patched_image.path, payload, scenario.calls)
    problems = proof.problems(scenario.calls)
    assert not problems, "behaviour differs from the patched build:\n  " + "\n  ".join(problems)
    if scenario.endbr_patches is not None:
        assert proof.patch_offsets.count(abi.ENDBR64_LEN) == scenario.endbr_patches, \
            f"jumps written after ENDBR64: {proof.patch_offsets}"


PAYLOAD_SCENARIOS = [d for d in SCENARIO_DIRS if load_scenario(d).payload_expected]


@pytest.mark.parametrize("directory", PAYLOAD_SCENARIOS, ids=[d.name for d in PAYLOAD_SCENARIOS])
def test_scenario_calls_see_the_change(directory: Path, toolchain: Toolchain, orig_image: Image,
                                       tmp_path: Path) -> None:
    """Without xsbuild: the patched build answers some call differently from the original.

    Otherwise the behavioural proof of that scenario could not fail.
    """
    scenario = load_scenario(directory)
    patched = build_image(toolchain, patched_sources(scenario.patch, tmp_path),
                          tmp_path / "xen-syms.patched")
    original = plain_rounds(orig_image.path, scenario.calls)
    changed = plain_rounds(patched.path, scenario.calls)
    assert original[1] != changed[1], f"{scenario.name}: calls cannot tell the builds apart"


@pytest.mark.parametrize("name", sorted(base_sources()))
def test_self_diff_is_no_change(name: str, toolchain: Toolchain, tmp_path: Path) -> None:
    """Diffing an object against itself never reports a change (exit 3, no output)."""
    require_commands("diff")
    obj = toolchain.compile_source(base_sources()[name], name)
    (tmp_path / "out").mkdir()
    run_diff(obj, obj, tmp_path / "out" / "self.o", ObjectExpect(name, exit=3))


def test_every_scenario_has_calls_or_refuses() -> None:
    """A scenario that yields a payload must prove behaviour with at least one call."""
    for directory in SCENARIO_DIRS:
        scenario = load_scenario(directory)
        if scenario.payload_expected:
            assert scenario.calls, f"{scenario.name} has no [[calls]]"
