"""``xsbuild prove`` against Debian's real tree: the prover's evidence.

Payloads built by ``xsbuild build`` from the e2e patches are proven against the hypervisor the
tree's own make builds from the same patches; then each payload is altered on purpose (a string
byte, a call retargeted, a relocation addend, an immediate, an alternative's cpuid or site, an
exception-table fixup, a replacement dropped) and each alteration must be caught, with the
function, the place and both sides named.  Every altered payload is first written back
unaltered and proven, so a caught mutation is the mutation's doing, not the rewrite's.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.xen.debian_tree import DebianTree
from xsbuild import xen_abi
from xsbuild.elf import Elf, Reloc, elf_bytes, read_elf
from xsbuild.patched import build_patched
from xsbuild.prove import (
    DiffKind,
    LinkedImage,
    PayloadImage,
    ProofReport,
    Verdict,
    prove_images,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "tests" / "xen" / "patches"
SCHEMA = ROOT / "docs" / "json-schema" / "xsbuild.prove-1.schema.json"


@dataclass
class Scenario:
    stem: str
    patch: Path
    payload: Path
    patched: LinkedImage
    candidates: set[str]


def patch_path(stem: str) -> Path:
    [path] = PATCHES.glob(f"{stem}-*.patch")
    return path


def header_args(patch: Path) -> list[str]:
    for line in patch.read_text().splitlines():
        if line.startswith("xsbuild-build-args:"):
            return line.split(":", 1)[1].split()
    return []


def touched_files(patch: Path) -> list[str]:
    return [line.split()[1].removeprefix("b/") for line in patch.read_text().splitlines()
            if line.startswith("+++ ")]


def xsbuild(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xsbuild", *args], capture_output=True,
                          text=True, check=False)


@pytest.fixture(scope="module")
def orig(debian_tree: DebianTree) -> LinkedImage:
    return LinkedImage(debian_tree.source_top / "xen" / "xen-syms")


@pytest.fixture(scope="module")
def scenario(debian_tree: DebianTree, tmp_path_factory: pytest.TempPathFactory
             ) -> Callable[[str], Scenario]:
    out = tmp_path_factory.mktemp("prove")
    made: dict[str, Scenario] = {}

    def get(stem: str) -> Scenario:
        if stem in made:
            return made[stem]
        patch = patch_path(stem)
        payload = out / f"{stem}.livepatch"
        run = xsbuild("build", "--srcdir", str(debian_tree.source_top), "--patch", str(patch),
                      "--xen-syms", str(debian_tree.debian_xen_syms), "-o", str(payload), "-q",
                      *header_args(patch))
        assert run.returncode == 0, run.stderr
        built = build_patched(debian_tree.source_top, (patch,))
        # the private copy is back at the base: the patch reversed, no marker left
        assert not (built.copy / "xsbuild-prove.applied").exists()
        for rel in touched_files(patch):
            base_file, copy_file = debian_tree.source_top / rel, built.copy / rel
            assert copy_file.exists() == base_file.exists(), rel
            if base_file.exists():
                assert copy_file.read_bytes() == base_file.read_bytes(), rel
        (out / f"{stem}.xen-syms").write_bytes(built.xen_syms)
        candidates = built.functions
        made[stem] = Scenario(stem, patch, payload, LinkedImage(out / f"{stem}.xen-syms"),
                              candidates)
        return made[stem]

    return get


def prove(s: Scenario, orig: LinkedImage, path: Path) -> ProofReport:
    return prove_images(PayloadImage.load(path), s.patched, orig, s.candidates,
                        ProofReport(str(path)))


def rewrite(src: Path, dst: Path, change: Callable[[Elf], None] = lambda _e: None) -> Path:
    elf = read_elf(src)
    change(elf)
    dst.write_bytes(elf_bytes(elf))
    return dst


# ------------------------------------------------------------------------------------------
# The e2e payloads are proven


# The payloads the mutations below alter (tests/xen/test_build_e2e.py builds every e2e patch
# with --prove and requires "proven": proving the others again here would only cost CI time).
@pytest.mark.parametrize("stem", ["01", "04", "07", "08", "11"])
def test_payload_proven(scenario: Callable[[str], Scenario], orig: LinkedImage,
                        tmp_path: Path, stem: str) -> None:
    s = scenario(stem)
    report = prove(s, orig, s.payload)
    assert report.verdict is Verdict.PROVEN, [d.describe() for d in report.differences()]
    assert report.changed_in_xen, "the patch changes nothing in the hypervisor?"
    carried = {f.name for f in report.functions}
    assert set(report.changed_in_xen) <= carried
    # the rewrite the mutation tests use changes nothing by itself
    again = prove(s, orig, rewrite(s.payload, tmp_path / "same.livepatch"))
    assert again.verdict is Verdict.PROVEN


# ------------------------------------------------------------------------------------------
# Mutations: each caught, with the right message


def text_relocs(elf: Elf, func: str) -> list[Reloc]:
    sec = elf.section(f".text.{func}")
    assert sec is not None, [s.name for s in elf.sections]
    return sec.relocs


def symbol(elf: Elf, name: str):  # type: ignore[no-untyped-def]
    return next(s for s in elf.symbols if s.name == name)


def only(report: ProofReport, kind: DiffKind) -> list[str]:
    assert report.verdict is Verdict.NOT_PROVEN
    found = [d for d in report.differences() if d.kind is kind]
    assert found, [d.describe() for d in report.differences()]
    return [d.describe() for d in found]


def test_mutation_string_byte(scenario: Callable[[str], Scenario], orig: LinkedImage,
                              tmp_path: Path) -> None:
    s = scenario("01")

    def change(elf: Elf) -> None:
        sec = elf.section(".rodata.str1.1")
        assert sec is not None and b"-xsb-changed" in sec.data
        sec.data = sec.data.replace(b"-xsb-changed", b"-xsb-chanGed")

    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", change))
    [msg] = only(report, DiffKind.CODE)
    assert "xen_extra_version+0x0" in msg and "-xsb-chanGed" in msg and "-xsb-changed" in msg


def test_mutation_call_retargeted(scenario: Callable[[str], Scenario], orig: LinkedImage,
                                  tmp_path: Path) -> None:
    s = scenario("04")

    def change(elf: Elf) -> None:
        reloc = next(r for r in text_relocs(elf, "xsb_new_extra") if r.sym.name == "snprintf")
        reloc.sym = symbol(elf, "__x86_return_thunk")

    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", change))
    [msg] = only(report, DiffKind.CODE)
    assert "common/version.c#xsb_new_extra+" in msg
    assert "<__x86_return_thunk>" in msg and "<snprintf>" in msg


def test_mutation_relocation_addend(scenario: Callable[[str], Scenario], orig: LinkedImage,
                                    tmp_path: Path) -> None:
    s = scenario("04")

    def change(elf: Elf) -> None:
        [reloc] = text_relocs(elf, "xen_extra_version")
        reloc.addend += 8

    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", change))
    [msg] = only(report, DiffKind.CODE)
    assert "xen_extra_version+0x0" in msg
    assert "<common/version.c#xsb_new_extra+0x8>" in msg
    assert "<common/version.c#xsb_new_extra>" in msg


def test_mutation_immediate(scenario: Callable[[str], Scenario], orig: LinkedImage,
                            tmp_path: Path) -> None:
    import capstone

    s = scenario("08")
    func = "printk_start_of_line"
    elf = read_elf(s.payload)
    sec = elf.section(f".text.{func}")
    assert sec is not None
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    relocated = {r.offset for r in sec.relocs}
    insn = next(i for i in md.disasm(bytes(sec.data), 0)
                if i.imm_size and not (set(i.groups) & {1, 2})
                and i.address + i.imm_offset not in relocated)
    at = insn.address + insn.imm_offset

    def change(e: Elf) -> None:
        text = e.section(f".text.{func}")
        assert text is not None
        data = bytearray(text.data)
        data[at] ^= 0x01
        text.data = bytes(data)

    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", change))
    [msg] = only(report, DiffKind.CODE)
    assert f"drivers/char/console.c#{func}+{insn.address:#x}" in msg
    assert f"`{insn.mnemonic} {insn.op_str}`" in msg  # the patched hypervisor's, unaltered


def _alt_change(field: str) -> Callable[[Elf], None]:
    def change(elf: Elf) -> None:
        sec = elf.section(xen_abi.SEC_ALTINSTRUCTIONS)
        assert sec is not None and sec.size == xen_abi.ALT_INSTR_SIZE
        if field == "cpuid":
            data = bytearray(sec.data)
            (cpuid,) = struct.unpack_from("<H", data, 8)
            struct.pack_into("<H", data, 8, cpuid + 1)
            sec.data = bytes(data)
        else:
            next(r for r in sec.relocs if r.offset == 0).addend += 1

    return change


@pytest.mark.parametrize(("field", "needle"), [("cpuid", "cpuid="), ("site", "alternative at")])
def test_mutation_alternative(scenario: Callable[[str], Scenario], orig: LinkedImage,
                              tmp_path: Path, field: str, needle: str) -> None:
    s = scenario("08")
    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", _alt_change(field)))
    msgs = only(report, DiffKind.ALTERNATIVE)
    assert all("drivers/char/console.c#printk_start_of_line" in m for m in msgs)
    assert any(needle in m for m in msgs)
    if field == "cpuid":
        cpuid = struct.unpack_from("<H", read_elf(s.payload).section(
            xen_abi.SEC_ALTINSTRUCTIONS).data, 8)[0]  # type: ignore[union-attr]
        assert f"cpuid={cpuid + 1}" in msgs[0] and f"cpuid={cpuid} " in msgs[0]


def test_mutation_ex_table_fixup(scenario: Callable[[str], Scenario], orig: LinkedImage,
                                 tmp_path: Path) -> None:
    s = scenario("07")

    def change(elf: Elf) -> None:
        sec = elf.section(xen_abi.SEC_EX_TABLE)
        assert sec is not None
        cont = next(r for r in sec.relocs if r.offset == 4)
        assert cont.sym.name == "" or cont.sym.sec is not None
        cont.sym = symbol(elf, "compat_xen_version")
        cont.addend = 0x10

    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", change))
    [msg] = only(report, DiffKind.EX_TABLE)
    assert "compat_xen_version+0x" in msg and "<compat_xen_version+0x10>" in msg
    assert "<code#0>" in msg  # the patched hypervisor's entry goes to its .fixup code


def test_mutation_function_dropped(scenario: Callable[[str], Scenario], orig: LinkedImage,
                                   tmp_path: Path) -> None:
    s = scenario("11")
    payload = PayloadImage.load(s.payload)
    assert "xen_extra_version" in payload.replaced

    def change(elf: Elf) -> None:
        funcs = elf.section(xen_abi.SEC_FUNCS)
        assert funcs is not None
        size = xen_abi.FUNC_SIZE
        index = next(i for i in range(funcs.size // size)
                     if next(r for r in funcs.relocs if r.offset == i * size + 8).sym.name
                     == "xen_extra_version")
        start = index * size
        funcs.data = funcs.data[:start] + funcs.data[start + size:]
        funcs.size -= size
        kept = [r for r in funcs.relocs if not start <= r.offset < start + size]
        for r in kept:
            if r.offset >= start + size:
                r.offset -= size
        funcs.relocs = kept

    report = prove(s, orig, rewrite(s.payload, tmp_path / "m.livepatch", change))
    [msg] = only(report, DiffKind.MISSING)
    assert msg.startswith("missing: xen_extra_version differs between the original and the "
                          "patched hypervisor but the payload does not carry it")


# ------------------------------------------------------------------------------------------
# The command line


def test_cli_proven_json(debian_tree: DebianTree, scenario: Callable[[str], Scenario],
                         tmp_path: Path) -> None:
    import jsonschema

    s = scenario("01")
    run = xsbuild("prove", str(s.payload), "--srcdir", str(debian_tree.source_top),
                  "--patch", str(s.patch), "--json", "-q")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["verdict"] == "proven" and doc["changed_in_xen"] == ["xen_extra_version"]
    html = tmp_path / "proof.html"
    run = xsbuild("prove", str(s.payload), "--srcdir", str(debian_tree.source_top),
                  "--patch", str(s.patch), "--format", "html", "-o", str(html), "-q")
    assert run.returncode == 0 and "verdict: <b>proven</b>" in html.read_text()


def test_cli_not_proven_and_cannot_judge(debian_tree: DebianTree,
                                         scenario: Callable[[str], Scenario],
                                         tmp_path: Path) -> None:
    import jsonschema

    s = scenario("01")
    mutated = rewrite(s.payload, tmp_path / "m.livepatch", _string_byte)
    run = xsbuild("prove", str(mutated), "--srcdir", str(debian_tree.source_top),
                  "--patch", str(s.patch), "--json", "-q")
    assert run.returncode == 1
    doc = json.loads(run.stdout)
    jsonschema.validate(doc, json.loads(SCHEMA.read_text()))
    assert doc["verdict"] == "not-proven" and doc["difference_count"] == 1
    [line] = run.stderr.splitlines()
    assert line.startswith("xsbuild: error: ") and "not proven: code: xen_extra_version" in line
    # the hypervisor the payload names is not the base: no proof either way
    other = rewrite(s.payload, tmp_path / "other.livepatch", _other_hypervisor)
    run = xsbuild("prove", str(other), "--srcdir", str(debian_tree.source_top),
                  "--patch", str(s.patch), "-q")
    assert run.returncode == 2
    assert "cannot judge: the payload is for the hypervisor" in run.stderr
    assert "Traceback" not in run.stderr


def _string_byte(elf: Elf) -> None:
    sec = elf.section(".rodata.str1.1")
    assert sec is not None
    sec.data = sec.data.replace(b"-xsb-changed", b"-xsb-chanGed")


def _other_hypervisor(elf: Elf) -> None:
    sec = elf.section(xen_abi.SEC_XEN_DEPENDS)
    assert sec is not None
    data = bytearray(sec.data)
    data[-1] ^= 0xFF
    sec.data = bytes(data)
