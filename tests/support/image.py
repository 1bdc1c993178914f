"""The fixture image: fixture sources linked into one ELF that stands in for ``xen-syms``.

Like ``xen-syms`` it is a static executable with a build-id note (``--build-id=sha1``) and a
``.symtab`` in which each object's STT_FILE symbol precedes its locals and hidden globals stay
GLOBAL HIDDEN, so statics resolve as ``path#name`` exactly as in the hypervisor (spec §7).  The
objects are compiled with Xen's flags (``-fpic``, hidden visibility), so the link needs no
dynamic relocations at all.

It is linked at :data:`IMAGE_BASE` instead of Xen's address, where a user process can map it:
the loader child maps its PT_LOAD segments at their link addresses with ctypes
(:class:`xsbuild.sandbox.loader.LoadedImage`) and calls its functions.  (A shared object, the
first design, does not work: ``ld -shared`` turns hidden globals into locals after an empty
STT_FILE, so the symbol table would no longer look like the hypervisor's.)
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.toolchain import OBJCOPY, Toolchain, run
from xsbuild import xen_abi as abi
from xsbuild.sandbox.loader import IMAGE_BASE
from xsbuild.sandbox.toolchain import THUNKS, THUNKS_NAME, link_image

XEN_LINK_BASE = abi.XEN_TEXT_START_X86_64  # where xen-syms' .text starts


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


def build_image(toolchain: Toolchain, sources: dict[str, str], out: Path,
                base: int = IMAGE_BASE) -> Image:
    """Compile ``{unique_name: C text}`` with Xen's flags, add the thunks, link ``out``.

    ``unique_name`` is the path the hypervisor would know the file by (``common/sched.c``).
    """
    objects = [toolchain.compile_source(text, name) for name, text in sorted(sources.items())]
    objects.append(toolchain.assemble(THUNKS.read_text(), THUNKS_NAME))
    link_image(objects, out, base=base)
    return Image(out, read_build_id(out), tuple(objects))
