"""The payload model to bytes: dependency notes, metadata, the payload's own build-id.

Xen requires three GNU build-id notes (spec §1.6): ``.livepatch.xen_depends`` (the hypervisor the
payload was built for), ``.livepatch.depends`` (the hypervisor, or the payload it stacks on) and
``.note.gnu.build-id`` (the payload's own id, which a later payload names in its ``depends``).
All three are read at their load addresses, so they are SHF_ALLOC.  The own build-id is the SHA-1
of the whole file written with a zeroed descriptor, as ``ld --build-id=sha1`` computes it over its
output: the same inputs always give the same id.
"""

from __future__ import annotations

import hashlib

from xsbuild import __version__, xen_abi
from xsbuild.elf import (
    SHF_ALLOC,
    SHT_NOTE,
    SHT_PROGBITS,
    STT_SECTION,
    Elf,
    Section,
    Symbol,
    elf_bytes,
)
from xsbuild.xensyms import build_id_note

BUILD_ID_SIZE = 20  # SHA-1


def _note_section(name: str, body: bytes) -> Section:
    sec = Section(name=name, type=SHT_NOTE, flags=SHF_ALLOC, addralign=4, data=body,
                  size=len(body))
    sec.sym = Symbol(name="", type=STT_SECTION, sec=sec)
    return sec


def modinfo(name: str) -> bytes:
    """``.modinfo``: NUL-separated ``key=value`` strings that Xen returns with LIST."""
    return f"name={name}\0builder=xsbuild {__version__}\0".encode()


def payload_bytes(model: Elf, *, depends: bytes, xen_depends: bytes,
                  name: str) -> tuple[bytes, bytes]:
    """Serialise ``model`` with its notes; returns (file bytes, payload build-id)."""
    elf = Elf(path=model.path, sections=list(model.sections), symbols=list(model.symbols))
    extra = [
        _note_section(xen_abi.SEC_XEN_DEPENDS, build_id_note(xen_depends)),
        _note_section(xen_abi.SEC_DEPENDS, build_id_note(depends)),
    ]
    info = Section(name=xen_abi.SEC_MODINFO, type=SHT_PROGBITS, flags=SHF_ALLOC, addralign=1,
                   data=modinfo(name), size=len(modinfo(name)))
    own = _note_section(xen_abi.SEC_BUILD_ID, build_id_note(b"\0" * BUILD_ID_SIZE))
    for sec in [*extra, info, own]:
        elf.sections.append(sec)
        if sec.sym is not None:
            elf.symbols.append(sec.sym)
    blank = elf_bytes(elf)
    build_id = hashlib.sha1(blank, usedforsecurity=False).digest()
    own.data = build_id_note(build_id)
    return elf_bytes(elf), build_id
