"""``xsbuild inspect``: the report on a real payload, cross-checked against binutils.

The payload is built the way users build one: gcc with Xen's flags compiles an original and a
patched ``common/review.c`` (tests/support/toolchain.py), ``xsbuild diff`` and ``link`` turn
them into a payload for a fixture hypervisor image that contains the original
(tests/support/image.py).  The patch changes a constant, a callee, a string literal, adds a new
function, new data and a load hook, and touches functions with an alternative, an exception-table
entry and bug frames, so every part of the report has something real to show.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.handmade import FuncEntry, PayloadSpec, build_payload
from tests.support.image import Image, build_image, read_build_id
from tests.support.toolchain import Toolchain, readelf
from xsbuild import xen_abi
from xsbuild.diff import diff_files
from xsbuild.errors import ElfParseError, UsageError, XsbuildError
from xsbuild.inspection import InspectReport, inspect_payload, load_other_payload
from xsbuild.linker import link_files
from xsbuild.report import FORMATS, render
from xsbuild.xensyms import XenSymbols

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "docs" / "json-schema" / "xsbuild.inspect-1.schema.json"
UNIT = "common/review.c"
ORIG = r"""
#include "xen.h"
static int hits;
static noinline int helper_a(int x) { asm volatile ( "" : "+r" (x) ); return x + 1; }
static noinline int helper_b(int x) { asm volatile ( "" : "+r" (x) ); return x + 2; }
int review_scale(int x) { return x * 3 + 7; }
int review_pick(int x) { return helper_a(x) * 2; }
int review_other(int x) { return helper_b(x) - helper_a(x); }
const char *review_name(int i) { return i > 2 ? "many" : "few"; }
int review_fence(int x)
{
    alternative("lfence", "nop; nop; nop", X86_FEATURE_LFENCE_DISPATCH);
    WARN_ON(x < -1000);
    ASSERT(x != 1234567890);
    return x * 2;
}
PADDING
int review_read(const int *p)
{
    int v, rc;
    BUG_ON(p == NULL);
    rc = get_unsafe_int(v, p);
    return rc ? rc : v;
}
int review_hits(void) { return ++hits; }
""".replace("PADDING", "/*\n" + " * a bug frame keeps line bits in both words past line 127\n"
            * 130 + " */")
EXTRA = ('static noinline int review_extra(int x) { asm volatile ( "" : "+r" (x) ); '
         "return x ^ 0x55; }\n")
PATCHED = (ORIG.replace("static int hits;\n", "static int hits;\nstatic int review_seen;\n")
           .replace("x * 3 + 7", "x * 5 + 7")
           .replace("return helper_a(x) * 2;", "review_seen++;\n    return helper_b(x) * 2;")
           .replace('"many"', '"lots"')
           .replace("int review_fence(int x)\n", EXTRA + "int review_fence(int x)\n")
           .replace("return x * 2;\n}", "return x * 2 + review_extra(x);\n}")
           .replace("return rc ? rc : v;", "return rc ? rc : v + 1;")
           + "static void review_load(void) { hits = 0; }\nLIVEPATCH_LOAD_HOOK(review_load);\n")
CHANGED = ["review_scale", "review_pick", "review_name", "review_fence", "review_read"]


@dataclass(frozen=True)
class Built:
    image: Image
    payload: Path
    work: Path


@pytest.fixture(scope="module")
def built(toolchain: Toolchain, tmp_path_factory: pytest.TempPathFactory) -> Built:
    work = tmp_path_factory.mktemp("inspect")
    orig = toolchain.compile_source(ORIG, UNIT)
    patched = toolchain.compile_source(PATCHED, UNIT)
    image = build_image(toolchain, {UNIT: ORIG}, work / "xen-syms")
    diff_files(orig, patched, work / "review.o")
    link_files([work / "review.o"], work / "fix.livepatch", xen_syms=image.path)
    return Built(image, work / "fix.livepatch", work)


@pytest.fixture(scope="module")
def report(built: Built) -> InspectReport:
    return inspect_payload(built.payload, XenSymbols.load(built.image.path))


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


def nm_sizes(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (address, size) from real ``nm -S``."""
    out = subprocess.run(["nm", "-S", str(path)], capture_output=True, text=True,
                         check=True).stdout
    syms = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 4:
            syms[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    return syms


def objdump_offsets(path: Path, section: str) -> list[int]:
    out = subprocess.run(["objdump", "-d", "--insn-width=16", f"--section={section}", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return [int(m.group(1), 16) for m in re.finditer(r"^\s+([0-9a-f]+):\t", out, re.M)]


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# --------------------------------------------------------------------------------------------
# The funcs table


def test_funcs_table_gives_real_old_addresses_sizes_and_sources(report: InspectReport,
                                                                built: Built):
    nm = nm_sizes(built.image.path)
    payload_syms = nm_sizes(built.payload)
    assert [f.name for f in report.funcs] == CHANGED
    for f in report.funcs:
        assert (f.old_addr, f.old_size) == nm[f.name], f.name
        assert f.old_addr_source == "payload"  # xsbuild link writes it
        assert f.new_symbol == f.name and f.new_section == f".text.{f.name}"
        assert f.new_offset == 0 and f.new_size == payload_syms[f.name][1]
        assert f.source_file == UNIT and f.version == xen_abi.LIVEPATCH_PAYLOAD_VERSION
        assert not f.is_nop
    assert report.loader_ok, report.problems


def test_old_addr_left_to_the_loader_is_resolved_from_xen_syms(toolchain: Toolchain,
                                                               hypervisor: Image,
                                                               tmp_path: Path):
    """A hand-made payload (spec §6 style) with old_addr 0 and a NOP entry."""
    spec = PayloadSpec("byname", funcs=[
        FuncEntry("xen_extra_version", "livepatch_xen_extra_version", old_addr="zero"),
        FuncEntry("xen_nop_target", None, old_addr="absolute", new_size=6)])
    payload = build_payload(toolchain, hypervisor, spec, tmp_path / "byname.livepatch")
    nm = nm_sizes(hypervisor.path)
    with_xs = inspect_payload(payload, XenSymbols.load(hypervisor.path))
    by_name, nop = with_xs.funcs
    assert (by_name.old_addr, by_name.old_addr_source) == (nm["xen_extra_version"][0],
                                                           "xen-syms")
    assert by_name.source_file == ""  # a global of a payload linked from several objects
    assert nop.is_nop and nop.new_size == 6 and nop.old_addr == nm["xen_nop_target"][0]
    replacement = with_xs.function("livepatch_xen_extra_version")
    assert replacement is not None and replacement.role == "replacement"
    assert replacement.old_code and replacement.old_code[-1].text.startswith("jmp <")
    without = inspect_payload(payload)
    assert (without.funcs[0].old_addr, without.funcs[0].old_addr_source) == (0, "load")
    doc = without.to_json()
    assert doc["funcs"][0]["old_addr"] is None and doc["funcs"][1]["nop"] is True


# --------------------------------------------------------------------------------------------
# Code


def test_disassembly_names_relocation_targets(report: InspectReport):
    texts = {f.name: [i.text for i in f.code] for f in report.functions}
    assert "call <common/review.c#helper_b>" in texts["review_pick"]
    assert any(re.fullmatch(r'lea \w+, \[rip \+ <\.rodata\.str1\.1\+0x[0-9a-f]+ "lots">\]', t)
               for t in texts["review_name"]), texts["review_name"]
    assert texts["review_fence"].count("call <common/review.c#review_extra>") == 2
    assert "jmp <__x86_return_thunk>" in texts["review_scale"]
    seen = [t for t in texts["review_pick"] if "review_seen" in t]
    assert seen and "rip + <common/review.c#review_seen>" in seen[0]


def test_disassembly_covers_each_function_as_objdump_does(report: InspectReport, built: Built):
    for f in report.functions:
        offsets = [i.address for i in f.code]
        assert offsets == objdump_offsets(built.payload, f.section), f.name
        assert sum(i.size for i in f.code) == f.size


def test_old_code_from_xen_syms_beside_the_new(report: InspectReport, built: Built):
    nm = nm_sizes(built.image.path)
    pick = report.function("review_pick")
    assert pick is not None and pick.old_code is not None
    assert pick.old_code[0].address == nm["review_pick"][0]
    assert "call <common/review.c#helper_a>" in [i.text for i in pick.old_code]
    assert "call <common/review.c#helper_b>" in [i.text for i in pick.code]
    scale = report.function("review_scale")
    assert scale is not None and scale.old_code is not None
    # Same first instruction, another constant: x * 3 + 7 became x * 5 + 7.
    assert scale.old_code[0].text == "lea eax, [rdi + rdi*2 + 7]"
    assert scale.code[0].text == "lea eax, [rdi + rdi*4 + 7]"
    for f in report.functions:
        if f.role == "replacement":
            assert f.old_code and sum(i.size for i in f.old_code) == nm[f.name][1]
    no_xs = inspect_payload(built.payload)
    assert all(f.old_code is None for f in no_xs.functions)
    assert "--xen-syms" in (no_xs.function("review_pick") or pick).old_code_note


def test_new_functions_data_and_hooks(report: InspectReport):
    roles = {f.name: f.role for f in report.functions}
    assert roles == {**dict.fromkeys(CHANGED, "replacement"),
                     "common/review.c#review_extra": "new",
                     "common/review.c#review_load": "hook"}
    assert [(d.name, d.kind) for d in report.data] == [("common/review.c#review_seen",
                                                        "zero-initialised")]
    assert [(h.kind, h.function) for h in report.hooks] == [("load",
                                                             "common/review.c#review_load")]
    assert not report.safe_to_reapply  # it carries a .bss variable


# --------------------------------------------------------------------------------------------
# Relocations and special sections


def _readelf_relocs(path: Path) -> list[tuple[str, int, str]]:
    """(relocated section, offset, symbol) of every relocation, from real ``readelf -r``."""
    out, section = [], ""
    for line in readelf("-r", path).splitlines():
        m = re.match(r"Relocation section '\.rela(\S+)'", line)
        if m:
            section = m.group(1)
            continue
        parts = line.split()
        if len(parts) >= 5 and re.fullmatch(r"[0-9a-f]{16}", parts[0]):
            out.append((section, int(parts[0], 16), parts[4]))
    return out


def test_relocations_grouped_by_target(report: InspectReport, built: Built):
    groups = {g.target: g for g in report.relocations}
    relocs = _readelf_relocs(built.payload)
    thunk = groups["__x86_return_thunk"]
    assert thunk.kind == "hypervisor" and thunk.types == ["R_X86_64_PLT32"]
    assert thunk.count == sum(sym == "__x86_return_thunk" for _s, _o, sym in relocs)
    helper = groups["common/review.c#helper_b"]
    [(sec, off, _sym)] = [r for r in relocs if r[2] == "common/review.c#helper_b"]
    assert (helper.kind, helper.sites) == ("hypervisor", [f"review_pick+{off:#x}"])
    assert sec == ".text.review_pick"
    extra = groups["common/review.c#review_extra"]
    assert extra.kind == "payload" and extra.count == 2
    assert all(s.startswith("review_fence+") for s in extra.sites)
    strings = [g for g in report.relocations if g.kind == "string"]
    assert any('"lots"' in g.target and g.sites == ["review_name+0x6"] for g in strings)
    assert sum(g.count for g in report.relocations) == len(
        [r for r in relocs if not r[0].startswith((".note", ".comment"))])


def test_special_section_entries_with_their_functions(report: InspectReport):
    by_section: dict[str, list] = {}
    for e in report.special:
        by_section.setdefault(e.section, []).append(e)
    [alt] = by_section[".altinstructions"]
    assert alt.owner == "review_fence"
    assert (alt.fields["orig_code"], alt.fields["repl_code"]) == ("lfence", "nop; nop; nop")
    assert alt.fields["cpuid"] == 3 * 32 + 2 and alt.fields["orig_len"] == 3
    [ex] = by_section[".ex_table"]
    assert ex.owner == "review_read" and str(ex.fields["addr"]).startswith("review_read+")
    assert "jmp <review_read+" in str(ex.fields["cont_code"])  # the fixup returns into it
    [warn] = by_section[".bug_frames.1"]
    [bug] = by_section[".bug_frames.2"]
    assert (warn.owner, warn.fields["kind"]) == ("review_fence", "warn")
    assert warn.fields["line"] == line_of(PATCHED, "WARN_ON(x < -1000);")
    assert (bug.owner, bug.fields["kind"]) == ("review_read", "bug")
    assert bug.fields["line"] == line_of(PATCHED, "BUG_ON(p == NULL);")
    assert str(bug.fields["file"]).endswith("review.c")
    [assertion] = by_section[".bug_frames.3"]  # two frames: the second points at the message
    assert (assertion.owner, assertion.fields["message"]) == ("review_fence", "x != 1234567890")
    assert assertion.fields["line"] == line_of(PATCHED, "ASSERT(x != 1234567890);")
    [hook] = by_section[".livepatch.hooks.load"]
    assert (hook.owner, hook.summary) == ("common/review.c#review_load",
                                          "load hook calls common/review.c#review_load")
    assert {e.summary for e in by_section[".modinfo"]} >= {"name=fix"}


# --------------------------------------------------------------------------------------------
# Dependencies


def test_dependencies_name_the_hypervisor_and_the_payload(report: InspectReport,
                                                          built: Built):
    deps = {d.section: d for d in report.dependencies}
    assert deps[".livepatch.xen_depends"].build_id.hex() == built.image.build_id
    assert deps[".livepatch.xen_depends"].belongs_to == "this hypervisor (xen-syms)"
    assert deps[".livepatch.depends"].kind == "hypervisor"
    assert deps[".note.gnu.build-id"].build_id.hex() == read_build_id(built.payload)
    assert deps[".note.gnu.build-id"].kind == "self"


def test_stacked_payload_names_the_payload_it_depends_on(built: Built):
    first = inspect_payload(built.payload)
    first_id = next(d.build_id for d in first.dependencies if d.kind == "self")
    second = built.work / "second.livepatch"
    link_files([built.work / "review.o"], second, xen_syms=built.image.path, depends=first_id,
               name="second")
    xs = XenSymbols.load(built.image.path)
    named = inspect_payload(second, xs, [load_other_payload(built.payload)])
    dep = next(d for d in named.dependencies if d.section == xen_abi.SEC_DEPENDS)
    assert dep.kind == "payload" and "payload fix" in dep.belongs_to
    assert str(built.payload) in dep.belongs_to
    anonymous = inspect_payload(second, xs)
    dep = next(d for d in anonymous.dependencies if d.section == xen_abi.SEC_DEPENDS)
    assert dep.kind == "payload" and "another payload (stacked)" in dep.belongs_to


# --------------------------------------------------------------------------------------------
# CLI, JSON, errors


def test_cli_json_validates_against_the_schema(built: Built):
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for extra in ([], ["--xen-syms", built.image.path]):
        proc = run_cli("inspect", built.payload, "--format", "json", *extra)
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        jsonschema.Draft202012Validator(schema).validate(doc)
        assert doc["schema"] == "xsbuild.inspect/1"
        assert [f["name"] for f in doc["funcs"]] == CHANGED


def test_cli_text_report(built: Built, tmp_path: Path):
    out = tmp_path / "report.txt"
    proc = run_cli("inspect", built.payload, "--xen-syms", built.image.path, "-o", out)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    text = out.read_text()
    nm = nm_sizes(built.image.path)
    assert re.search(rf"^  0  review_scale\s+{nm['review_scale'][0]:#x}\s+9\s+"
                     r"\.text\.review_scale\+0x0\s+9\s+common/review\.c$", text, re.M), text
    assert "- +0x0000  e8" in text and "call <common/review.c#helper_a>" in text
    assert re.search(r"^    \+ \+0x0007 +e800000000 +call <common/review\.c#helper_b>$", text, re.M)
    assert "this hypervisor (xen-syms)" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]  # no temp files left


def _bad(built: Built, tmp: Path, case: str) -> list[str | Path]:
    if case == "not_elf":
        (tmp / "x.livepatch").write_text("not a payload\n")
        return [tmp / "x.livepatch"]
    if case == "truncated":
        (tmp / "x.livepatch").write_bytes(built.payload.read_bytes()[:300])
        return [tmp / "x.livepatch"]
    if case == "not_a_payload":
        return [_plain_object(built, tmp)]
    if case == "xen_syms_not_elf":
        (tmp / "xen-syms").write_text("#!/bin/sh\n")
        return [built.payload, "--xen-syms", tmp / "xen-syms"]
    if case == "other_not_payload":
        return [built.payload, "--payload", _plain_object(built, tmp)]
    raise AssertionError(case)


def _plain_object(built: Built, tmp: Path) -> Path:
    obj = tmp / "plain.o"
    obj.write_bytes(built.image.objects[0].read_bytes())
    return obj


@pytest.mark.parametrize("case", ["not_elf", "truncated", "not_a_payload", "xen_syms_not_elf",
                                  "other_not_payload"])
def test_bad_input_is_one_line_exit_2_and_no_output(built: Built, tmp_path: Path, case: str):
    args = _bad(built, tmp_path, case)
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    proc = run_cli("inspect", *args, "--format", "html", "-o", out)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xsbuild: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out.parent.iterdir())


def test_library_errors_are_typed(built: Built, tmp_path: Path):
    with pytest.raises(ElfParseError):
        inspect_payload(_bad(built, tmp_path, "not_elf")[0])
    with pytest.raises(UsageError, match="not a live-patch payload"):
        inspect_payload(_plain_object(built, tmp_path))


def test_help_teaches_and_stays_light():
    proc = run_cli("inspect", "--help")
    assert proc.returncode == 0 and "xsbuild inspect fix.livepatch --xen-syms" in proc.stdout
    # capstone and jinja2 are imported by the commands that use them, not by --help.
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "xsbuild", "--help"],
                          capture_output=True, text=True, timeout=60, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()}
    assert not {"capstone", "jinja2", "xsbuild.inspection", "xsbuild.report"} & imported


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1,
                      max_size=6))
def test_mutated_payloads_give_a_report_or_a_typed_error(built: Built, tmp_path: Path,
                                                         edits: list[tuple[int, int]]):
    """Whatever the bytes, inspect reports or raises an XsbuildError: never another exception
    (which the CLI would turn into an internal error)."""
    data = bytearray(built.payload.read_bytes())
    for pos, value in edits:
        data[pos % len(data)] = value
    path = tmp_path / "mutated.livepatch"
    path.write_bytes(bytes(data))
    try:
        report = inspect_payload(path, XenSymbols.load(built.image.path))
    except XsbuildError:
        return
    for fmt in FORMATS:
        assert render(report, fmt)
