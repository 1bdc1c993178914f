"""Bug frames survive extraction: every frame of a payload designates the same file name,
message and line as the frame gcc emitted, decoded the way Xen decodes them.

Xen adds each displacement of a frame to the frame's start (x86 asm/bug.h ``bug_loc``,
``bug_ptr``, ``bug_msg``), although each field is relocated PC-relative at its own place; a
decoder that forgets the field's distance from the frame start reads 4 bytes past the file name
and 12 past an assert message, which goes unnoticed for long strings and picks a neighbouring
string for short ones (``ASSERT(v)``).  The decoder here is independent of xsbuild's readers:
pyelftools and the struct layout of spec §1.4 only.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from tests.support.image import build_image
from tests.support.toolchain import Toolchain
from xsbuild import xen_abi
from xsbuild.diff import diff_files
from xsbuild.linker import link_files

UNIT = "common/frames.c"
ORIG = r"""
#include "xen.h"
int frames_check(int v, int w);
int frames_check(int v, int w)
{
    return v + w;
}
int frames_other(int v);
int frames_other(int v)
{
    ASSERT(v != 12345);
    return v;
}
"""
# Short messages ("v", "w") next to a long one: the cases a frame-relative decoder gets wrong.
PATCHED = ORIG.replace("    return v + w;\n", """    ASSERT(v);
    ASSERT(w);
    WARN_ON(v == 77);
    BUG_ON(w == 78);
    ASSERT(v + w < 1000000 && "a much longer assertion message");
    return v + w;
""")
DISP_MASK = (1 << xen_abi.BUG_DISP_WIDTH) - 1
# (section, function, line, file name, message, points at a ud2)
Frame = tuple[str, str, int, str, str, bool]


def _disp(addend: int) -> tuple[int, int]:
    """(signed displacement, line bits) of a frame field's addend."""
    low = addend & DISP_MASK
    disp = low - (1 << xen_abi.BUG_DISP_WIDTH) if low >> (xen_abi.BUG_DISP_WIDTH - 1) else low
    return disp, (addend - low) >> xen_abi.BUG_DISP_WIDTH


def _cstring(elf: ELFFile, shndx: int, offset: int) -> str:
    data = elf.get_section(shndx).data()
    return data[offset:data.index(b"\0", offset)].decode()


def decode_frames(path: Path, owner: str | None = None) -> Counter[Frame]:
    """Every frame as (section, function, line, file name, message, points at a ud2), read
    Xen's way."""
    frames: Counter[Frame] = Counter()
    with path.open("rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        funcs = {(s["st_shndx"], s["st_value"]): s.name for s in symtab.iter_symbols()
                 if s["st_info"]["type"] == "STT_FUNC"}
        for sec in elf.iter_sections():
            if not isinstance(sec, RelocationSection):
                continue
            target = elf.get_section(sec["sh_info"]).name
            if target not in xen_abi.BUG_FRAME_SECTIONS:
                continue
            size = xen_abi.BUG_FRAME_SIZE * (2 if target.endswith(".3") else 1)
            fields: dict[int, dict[int, tuple[int, int]]] = {}
            for r in sec.iter_relocations():
                sym = symtab.get_symbol(r["r_info_sym"])
                frame, field = divmod(r["r_offset"], size)
                fields.setdefault(frame, {})[field] = (
                    sym["st_shndx"], sym["st_value"] + r["r_addend"])
            for entry in fields.values():
                (loc_sec, loc), (ptr_sec, ptr) = entry[0], entry[4]
                loc_disp, line_hi = _disp(loc)
                at_ud2 = elf.get_section(loc_sec).data()[loc_disp:loc_disp + 2] == b"\x0f\x0b"
                ptr_disp, line_lo = _disp(ptr)
                line = (line_hi << 7) | line_lo
                func = funcs.get((loc_sec, 0), "?")  # -ffunction-sections: one per section
                message = ""
                if 12 in entry:
                    msg_sec, msg = entry[12]
                    message = _cstring(elf, msg_sec, _disp(msg)[0] - 12)
                file_name = _cstring(elf, ptr_sec, ptr_disp - 4)
                if owner is None or func == owner:
                    frames[(target, func, line, file_name, message, at_ud2)] += 1
    return frames


def test_payload_frames_designate_what_gcc_emitted(toolchain: Toolchain, tmp_path: Path) -> None:
    orig = toolchain.compile_source(ORIG, UNIT)
    patched = toolchain.compile_source(PATCHED, UNIT)
    image = build_image(toolchain, {UNIT: ORIG}, tmp_path / "xen-syms")
    diff_files(orig, patched, tmp_path / "frames.o")
    payload = tmp_path / "frames.livepatch"
    link_files([tmp_path / "frames.o"], payload, xen_syms=image.path)

    expected = decode_frames(patched, owner="frames_check")
    messages = {m for (_s, _f, _l, _n, m, _u) in expected}
    assert all(at_ud2 for (*_rest, at_ud2) in expected)
    assert {"v", "w", 'v + w < 1000000 && "a much longer assertion message"'} <= messages
    assert {s for (s, *_rest) in expected} == {".bug_frames.1", ".bug_frames.2",
                                               ".bug_frames.3"}
    # The payload carries exactly the changed function's frames, designating the same things;
    # frames_other is unchanged and stays in the hypervisor with its own frame.
    assert decode_frames(payload) == expected
