"""``xsbuild explain``: every function's verdict and reason, on real gcc objects.

Original and patched ``common/explain.c`` are compiled with Xen's flags
(tests/support/toolchain.py).  The patch changes a constant (first differing instruction), a
callee (a relocation that now points elsewhere), a string literal (old and new text), removes a
function and adds one that only a changed function calls (pulled into the payload by that call).
A second patched version changes initialised data, which must be refused and still explained.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.toolchain import Toolchain, readelf
from tests.test_scenarios import SCENARIO_DIRS, base_sources, load_scenario, patched_sources
from xsbuild.diff import diff_files
from xsbuild.errors import ElfParseError, InputMismatchError, XsbuildError
from xsbuild.explain import ExplainReport, explain_files
from xsbuild.report import FORMATS, render

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "docs" / "json-schema" / "xsbuild.explain-1.schema.json"
UNIT = "common/explain.c"
ORIG = r"""
#include "xen.h"
int explain_table[4] = { 1, 2, 3, 4 };
static noinline int helper_a(int x) { asm volatile ( "" : "+r" (x) ); return x + 1; }
static noinline int helper_b(int x) { asm volatile ( "" : "+r" (x) ); return x + 2; }
int explain_scale(int x) { return x * 3 + 7; }
int explain_pick(int x) { return helper_a(x) * 2; }
int explain_other(int x) { return helper_b(x) - helper_a(x); }
const char *explain_name(int i) { return i > 2 ? "many" : "few"; }
int explain_count(int x) { return x + explain_table[x & 3]; }
int explain_gone(void) { return 42; }
"""
PATCHED = (ORIG.replace("x * 3 + 7", "x * 5 + 7")
           .replace("return helper_a(x) * 2;", "return helper_b(x) * 2;")
           .replace('"many"', '"lots"')
           .replace("int explain_gone(void) { return 42; }\n", "")
           .replace("int explain_count(int x) { return x + explain_table[x & 3]; }",
                    'static noinline int explain_extra(int x) { asm volatile ( "" : "+r" (x) ); '
                    "return x ^ 0x55; }\n"
                    "int explain_count(int x) { return explain_extra(x) + explain_table[x & 3]; }"))
DATA = ORIG.replace("{ 1, 2, 3, 4 }", "{ 1, 2, 3, 5 }")


@pytest.fixture(scope="module")
def objects(toolchain: Toolchain) -> dict[str, Path]:
    return {name: toolchain.compile_source(text, UNIT)
            for name, text in (("orig", ORIG), ("patched", PATCHED), ("data", DATA))}


@pytest.fixture(scope="module")
def report(objects: dict[str, Path]) -> ExplainReport:
    return explain_files(objects["orig"], objects["patched"])


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def objdump_bytes(obj: Path, section: str) -> dict[int, str]:
    """Instruction offset -> its bytes (hex), from real ``objdump -d``."""
    out = subprocess.run(["objdump", "-d", "--insn-width=16", f"--section={section}", str(obj)],
                         capture_output=True, text=True, check=True).stdout
    return {int(m.group(1), 16): m.group(2).replace(" ", "")
            for m in re.finditer(r"^\s+([0-9a-f]+):\t([0-9a-f ]+?)\s*\t", out, re.M)}


def reloc_offsets(obj: Path, section: str, symbol: str) -> list[int]:
    """Offsets of relocations in ``section`` against ``symbol`` (gcc references a static
    function through its section symbol, ``.text.helper_b``), from real ``readelf -r``."""
    out, active = [], False
    for line in readelf("-r", obj).splitlines():
        if line.startswith("Relocation section"):
            active = f"'.rela{section}'" in line
        elif active and {symbol, f".text.{symbol}"} & set(line.split()):
            out.append(int(line.split()[0], 16))
    return out


def statuses(report: ExplainReport) -> dict[str, str]:
    return {f.name: f.status for f in report.functions}


def test_every_function_of_both_objects_has_a_verdict(report: ExplainReport):
    assert statuses(report) == {
        "explain_scale": "changed", "explain_pick": "changed", "explain_name": "changed",
        "explain_count": "changed", "explain_extra": "new", "explain_gone": "removed",
        "helper_a": "same", "helper_b": "same", "explain_other": "same"}
    assert report.status == "changed" and report.exit_code == 0
    assert report.unit == UNIT
    # Ordered for a reviewer: what changed first, what stayed the same last.
    assert [f.status for f in report.functions][-3:] == ["same"] * 3


def test_constant_change_shows_the_first_differing_instruction(report: ExplainReport,
                                                               objects: dict[str, Path]):
    f = report.function("explain_scale")
    assert f is not None and f.difference is not None
    d = f.difference
    assert d.kind == "code" and f.reason.startswith("code differs at +")
    assert d.old is not None and d.new is not None and d.offset is not None
    assert d.old.covers(d.offset) and d.new.covers(d.offset)
    assert (d.old.text, d.new.text) == ("lea eax, [rdi + rdi*2 + 7]",
                                        "lea eax, [rdi + rdi*4 + 7]")
    # The bytes are the objects' own, instruction for instruction.
    assert objdump_bytes(objects["orig"], f.section)[d.old.offset] == d.old.raw.hex()
    assert objdump_bytes(objects["patched"], f.section)[d.new.offset] == d.new.raw.hex()


def test_callee_change_is_a_relocation_that_now_points_elsewhere(report: ExplainReport,
                                                                  objects: dict[str, Path]):
    f = report.function("explain_pick")
    assert f is not None and f.difference is not None
    d = f.difference
    [off] = reloc_offsets(objects["patched"], f.section, "helper_b")
    assert reloc_offsets(objects["orig"], f.section, "helper_a") == [off]
    assert d.kind == "relocation" and d.offset == off
    assert f.reason == f"relocation at +{off:#x} now points to helper_b (was helper_a)"
    assert (d.old_target, d.new_target) == ("helper_a", "helper_b")
    assert d.old is not None and d.new is not None
    assert (d.old.text, d.new.text) == ("call <helper_a>", "call <helper_b>")


def test_string_change_shows_old_and_new_text(report: ExplainReport):
    f = report.function("explain_name")
    assert f is not None and f.difference is not None
    d = f.difference
    assert (d.old_string, d.new_string) == ("many", "lots")
    assert 'string "lots" (was string "many")' in f.reason
    assert d.new is not None and '"lots"' in d.new.text and "rip + <" in d.new.text


def test_new_function_is_pulled_in_by_the_call_that_uses_it(report: ExplainReport,
                                                            objects: dict[str, Path]):
    f = report.function("explain_extra")
    assert f is not None and f.included and f.new_code
    inclusion = {i.name: i for i in report.included}
    pulled = inclusion["explain_extra"]
    [off] = reloc_offsets(objects["patched"], ".text.explain_count", "explain_extra")
    assert (pulled.why, pulled.by, pulled.at) == ("referenced", "explain_count", off)
    assert pulled.via == "call <explain_extra>"
    assert pulled.xen_name == f"{UNIT}#explain_extra"
    assert {n for n, i in inclusion.items() if i.why == "changed"} == {
        "explain_scale", "explain_pick", "explain_name", "explain_count"}
    # The inclusion record does not change what the differ includes.
    diffed = diff_files(objects["orig"], objects["patched"])
    assert [u.name for u in diffed.included] == [i.name for i in report.included]


def test_changed_data_is_refused_and_still_explained(objects: dict[str, Path]):
    report = explain_files(objects["orig"], objects["data"])
    assert report.status == "refused" and report.exit_code == 1
    [message] = report.refused
    assert "explain_table" in message and "changed initialised data" in message
    [data] = report.data
    assert (data.name, data.status, data.offset) == ("explain_table", "changed", 12)
    assert (data.old_bytes, data.new_bytes) == ((4).to_bytes(4, "little"),
                                                (5).to_bytes(4, "little"))
    assert set(statuses(report).values()) == {"same"}


def test_cli_exit_codes_and_text(objects: dict[str, Path]):
    proc = run_cli("explain", objects["orig"], objects["patched"])
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^  changed  explain_pick +\d+ +relocation at \+0x1 now points to "
                     r"helper_b \(was helper_a\)$", proc.stdout, re.M), proc.stdout
    assert "First difference in explain_scale:" in proc.stdout
    assert 'string: "many" -> "lots"' in proc.stdout
    assert "referenced by explain_count+0x1: call <explain_extra>" in proc.stdout
    refused = run_cli("explain", objects["orig"], objects["data"])
    assert refused.returncode == 1 and "REFUSED" in refused.stdout
    assert "changed initialised data" in refused.stdout and refused.stderr == ""
    same = run_cli("explain", objects["orig"], objects["orig"])
    assert same.returncode == 3 and "no functional change" in same.stdout


def test_cli_json_validates_against_the_schema(objects: dict[str, Path], tmp_path: Path):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for other, code, status in (("patched", 0, "changed"), ("data", 1, "refused"),
                                ("orig", 3, "no-change")):
        out = tmp_path / f"{other}.json"
        proc = run_cli("explain", objects["orig"], objects[other], "--format", "json", "-o", out)
        assert proc.returncode == code, proc.stderr
        doc = json.loads(out.read_text())
        validator.validate(doc)
        assert (doc["schema"], doc["status"]) == ("xsbuild.explain/1", status)
    doc = json.loads((tmp_path / "patched.json").read_text())
    assert doc["summary"] == {"changed": 4, "new": 1, "removed": 1, "same": 3}


def test_bad_input_is_one_line_exit_2(objects: dict[str, Path], toolchain: Toolchain,
                                      tmp_path: Path):
    text = tmp_path / "x.o"
    text.write_text("hello\n")
    other_unit = toolchain.compile_source(ORIG, "common/other.c")
    for args in ((text, objects["patched"]), (objects["orig"], other_unit)):
        out = tmp_path / "out.html"
        proc = run_cli("explain", *args, "--format", "html", "-o", out)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("xsbuild: error:"), proc.stderr
        assert not out.exists()
    with pytest.raises(ElfParseError):
        explain_files(text, objects["patched"])
    with pytest.raises(InputMismatchError):
        explain_files(objects["orig"], other_unit)


def test_help_teaches():
    proc = run_cli("explain", "--help")
    assert proc.returncode == 0
    assert "xsbuild explain orig/common/version.o patched/common/version.o" in proc.stdout
    assert "3 no functional change" in proc.stdout


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_mutated_objects_give_a_report_or_a_typed_error(objects: dict[str, Path],
                                                        tmp_path: Path,
                                                        edits: list[tuple[int, int]]):
    """Whatever the bytes, explain reports or raises an XsbuildError, and every report
    renders."""
    data = bytearray(objects["patched"].read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    path = tmp_path / "mutated.o"
    path.write_bytes(bytes(data))
    try:
        report = explain_files(objects["orig"], path)
    except XsbuildError:
        return
    for fmt in FORMATS:
        assert render(report, fmt)


@pytest.mark.parametrize("directory", SCENARIO_DIRS, ids=[d.name for d in SCENARIO_DIRS])
def test_explain_agrees_with_diff_on_every_scenario(directory: Path, toolchain: Toolchain,
                                                   tmp_path: Path):
    """On each fixture scenario (tests/test_scenarios.py), explain's verdict is the one the
    scenario expects from ``xsbuild diff``, every changed function comes with a difference,
    and the report validates and renders."""
    scenario = load_scenario(directory)
    base, patched = base_sources(), patched_sources(scenario.patch, tmp_path)
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    for exp in scenario.objects:
        allow = [a for a in exp.diff_args if not a.startswith("-")]
        report = explain_files(toolchain.compile_source(base[exp.file], exp.file),
                               toolchain.compile_source(patched[exp.file], exp.file),
                               allow_new_statics=allow)
        assert report.exit_code == exp.exit, (exp.file, report.refused)
        validator.validate(report.to_json())
        for fmt in FORMATS:
            assert render(report, fmt)
        changed = {f.name for f in report.functions if f.status == "changed"}
        if exp.exit == 0:
            assert exp.changed <= changed <= exp.changed | exp.changed_optional | {
                f"{n}.cold" for n in exp.changed}, (exp.file, changed)
        for f in report.functions:
            if f.status == "changed":
                assert f.difference is not None and f.old_code and f.new_code, f.name
                if f.difference.kind != "other":
                    assert f.difference.old or f.difference.new, f.name
