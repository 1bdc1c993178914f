"""The fixture image: fixture sources linked into one ELF that stands in for ``xen-syms``.

Like ``xen-syms`` it is a static executable with a build-id note (``--build-id=sha1``) and a
``.symtab`` in which each object's STT_FILE symbol precedes its locals and hidden globals stay
GLOBAL HIDDEN, so statics resolve as ``path#name`` exactly as in the hypervisor (spec §7).  The
objects are compiled with Xen's flags (``-fpic``, hidden visibility), so the link needs no
dynamic relocations at all.

It is linked at :data:`IMAGE_BASE` instead of Xen's address, where a user process can map it:
the loader child maps its PT_LOAD segments at their link addresses with ctypes
(:class:`tests.support.loader.LoadedImage`) and calls its functions.  (A shared object, the
first design, does not work: ``ld -shared`` turns hidden globals into locals after an empty
STT_FILE, so the symbol table would no longer look like the hypervisor's.)
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.loader import IMAGE_BASE
from tests.support.toolchain import FIXTURES, LD, OBJCOPY, Toolchain, run
from xsbuild import xen_abi as abi

XEN_LINK_BASE = abi.XEN_TEXT_START_X86_64  # where xen-syms' .text starts
THUNKS = FIXTURES / "image" / "thunks.S"


@dataclass(frozen=True)
class Image:
    """A linked fixture image: the file and its build-id (hex)."""

    path: Path
    build_id: str
    objects: tuple[Path, ...]


def read_build_id(elf: Path) -> str:
    """The GNU build-id of an ELF file as hex, from its ``.note.gnu.build-id`` section."""
    note = note_section_bytes(elf, ".note.gnu.build-id")
    namesz, descsz = int.from_bytes(note[0:4], "little"), int.from_bytes(note[4:8], "little")
    start = 12 + ((namesz + 3) & ~3)
    return note[start:start + descsz].hex()


def note_section_bytes(elf: Path, section: str) -> bytes:
    """Raw bytes of one section, extracted with real objcopy (as Xen's test Makefile does)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sec.bin"
        run([OBJCOPY, "-O", "binary", f"--only-section={section}", str(elf), str(out)])
        return out.read_bytes()


def link_image(objects: list[Path], out: Path, base: int = IMAGE_BASE) -> Path:
    """Link objects (plus nothing else) into ``out`` atomically; see the module docstring.

    ``base=XEN_LINK_BASE`` gives an ELF at Xen's own addresses: readable, not runnable.
    """
    flags = ["-static", f"-Ttext-segment={base:#x}", "-e", "0", "-z", "noexecstack",
             "-z", "norelro"]
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        run([LD, "-melf_x86_64", "--build-id=sha1", *flags, "-o", tmp, *map(str, objects)])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def build_image(toolchain: Toolchain, sources: dict[str, str], out: Path,
                base: int = IMAGE_BASE) -> Image:
    """Compile ``{unique_name: C text}`` with Xen's flags, add the thunks, link ``out``.

    ``unique_name`` is the path the hypervisor would know the file by (``common/sched.c``).
    """
    objects = [toolchain.compile_source(text, name) for name, text in sorted(sources.items())]
    objects.append(toolchain.assemble(THUNKS.read_text(), "arch/x86/indirect-thunk.S"))
    link_image(objects, out, base=base)
    return Image(out, read_build_id(out), tuple(objects))
