"""xsbuild.elfraw, the one ELF reader, against binutils' readelf on objects gas and gcc made."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.support.toolchain import readelf, run
from xsbuild.elf import elf_bytes, read_elf
from xsbuild.elfraw import iter_notes, read_raw
from xsbuild.errors import ElfParseError

ASM = """\
.section .xsb_odd,"a",@0x6fffff42
.byte 1
.text
.globl f
f: ret
.data
.quad f
.long f - .
.section .note.xsb,"a",@note
.long 4, 3, 7
.asciz "XSB"
.byte 1, 2, 3
.balign 4
"""


@pytest.fixture(scope="module")
def obj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("as") is None:
        pytest.skip("binutils' as is not installed")
    work = tmp_path_factory.mktemp("elfraw")
    (work / "t.s").write_text(ASM)
    run(["as", "--64", "-o", str(work / "t.o"), str(work / "t.s")])
    return work / "t.o"


def _readelf_sections(path: Path) -> dict[str, int]:
    """name -> size of every section but the null one, from ``readelf -SW``."""
    out = {}
    for m in re.finditer(r"\[\s*([1-9]\d*)\]\s+(\S+)\s+\S+\s+[0-9a-f]+\s+[0-9a-f]+\s+([0-9a-f]+)",
                         readelf("-SW", path)):
        out[m.group(2)] = int(m.group(3), 16)
    return out


def test_sections_match_readelf(obj: Path) -> None:
    raw = read_raw(str(obj), obj.read_bytes())
    ours = {s.name: s.size for s in raw.sections[1:]}
    assert ours == _readelf_sections(obj)


def test_symbols_and_relocations_match_readelf(obj: Path) -> None:
    raw = read_raw(str(obj), obj.read_bytes())
    symtab = next(s for s in raw.sections if s.type == 2)
    names = [s.name for s in raw.symbols(symtab)]
    assert "f" in names
    count = int(re.search(r"contains (\d+) (?:entries|symbols)", readelf("-sW", obj)).group(1))
    assert len(names) == count
    rela = raw.section(".rela.data")
    assert rela is not None
    types = [t for _o, _s, t, _a in raw.relocations(rela)]
    listed = re.findall(r"R_X86_64_(\w+)", readelf("-rW", obj).split(".rela.data")[1])
    assert len(types) == len(listed) == 2


def test_notes(obj: Path) -> None:
    raw = read_raw(str(obj), obj.read_bytes())
    sec = raw.section(".note.xsb")
    assert sec is not None
    [note] = raw.notes(sec)
    assert (note.name, note.type, note.desc) == (b"XSB", 7, b"\x01\x02\x03")
    assert list(iter_notes(raw.body(sec)[:-4])) == []  # a truncated note is not returned


def test_read_then_write_keeps_unknown_section_types(obj: Path, tmp_path: Path) -> None:
    """The model keeps a section type it does not know as the number it was."""
    elf = read_elf(obj)
    out = tmp_path / "again.o"
    out.write_bytes(elf_bytes(elf))
    line = next(ln for ln in readelf("-SW", out).splitlines() if ".xsb_odd" in ln)
    assert "LOOS+0xfffff42" in line


@pytest.mark.parametrize(("cut", "message"), [
    (3, "not an ELF file"), (40, "truncated ELF header"), (None, "past the end of the file"),
])
def test_malformed_files_are_parse_errors(obj: Path, cut: int | None, message: str) -> None:
    data = obj.read_bytes()
    # None: drop the last byte, which belongs to the section header table at the end.
    data = data[:-1] if cut is None else data[:cut]
    with pytest.raises(ElfParseError, match=message):
        read_raw("x.o", data)
