"""Xen 4.21's ``.alt_call_sites`` travel with the functions a diff carries.

Each entry (``struct alt_call``, an s32 offset relative to itself, spec §8) names a 6-byte
``call *ptr(%rip)`` that Xen turns into a direct call at boot and, for a payload, at load.  With
CONFIG_XEN_IBT Xen then removes the ENDBR64 of functions only reached that way, so a payload's
indirect call left unconverted would fault on IBT hardware: the diff object must keep the entry
of every site in a function it carries, and only those (an entry naming a function it does not
carry would point outside the payload).  The objects are built by gcc from the source below
(two functions with the site as ``alternative_call`` emits it); the entries are decoded with
pyelftools, independently of xsbuild's readers.
"""

from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from tests.support.toolchain import Toolchain
from xsbuild import xen_abi
from xsbuild.diff import diff_files

UNIT = "arch/x86/altcall.c"
SOURCE = r"""
#include "xen.h"
void (*altcall_hook)(void);
int altcall_first(int v);
int altcall_second(int v);

#define ALT_CALL(ptr) \
    asm volatile ( "1: call *%c0(%%rip)\n\t"                                  \
                   ".pushsection .alt_call_sites, \"a\", @progbits\n\t"       \
                   ".long 1b - .\n\t"                                          \
                   ".popsection" :: "i" (&(ptr)) : "memory", "rax", "rcx",     \
                   "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11" )

int altcall_first(int v)
{
    ALT_CALL(altcall_hook);
    return v + FIRST;
}

int altcall_second(int v)
{
    ALT_CALL(altcall_hook);
    ALT_CALL(altcall_hook);
    return v * 3;
}
"""


def payload_sites(obj: Path) -> list[tuple[str, int]]:
    """(section, offset in it) of the call each .alt_call_sites entry names, in entry order."""
    with obj.open("rb") as fh:
        elf = ELFFile(fh)
        rela = elf.get_section_by_name(".rela" + xen_abi.SEC_ALT_CALL_SITES)
        if rela is None:
            return []
        assert isinstance(rela, RelocationSection)
        symtab = elf.get_section(rela["sh_link"])
        sites = []
        for r in sorted(rela.iter_relocations(), key=lambda r: r["r_offset"]):
            sym = symtab.get_symbol(r["r_info_sym"])
            section = elf.get_section(sym["st_shndx"]).name
            sites.append((section, r["r_addend"] + sym["st_value"]))
        return sites


def code_at(obj: Path, section: str, offset: int) -> bytes:
    with obj.open("rb") as fh:
        sec = ELFFile(fh).get_section_by_name(section)
        assert sec is not None, f"{section} not in {obj}"
        return sec.data()[offset:offset + xen_abi.ALT_CALL_SITE_LEN]


def test_sites_of_carried_functions_only(toolchain: Toolchain, tmp_path: Path) -> None:
    orig = toolchain.compile_source(SOURCE.replace("FIRST", "1"), UNIT)
    patched = toolchain.compile_source(SOURCE.replace("FIRST", "2"), UNIT)
    assert len(payload_sites(patched)) == 3  # gcc kept all three sites
    out = tmp_path / "altcall.o"
    result = diff_files(str(orig), str(patched), str(out))
    assert [u.name for u in result.changed_functions] == ["altcall_first"]
    sites = payload_sites(out)
    assert len(sites) == 1, sites
    [(where, offset)] = sites
    assert "altcall_first" in where, sites
    # The entry still names the indirect call (ff 15: call *disp32(%rip)).
    assert code_at(out, where, offset)[:2] == b"\xff\x15"
