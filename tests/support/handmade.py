"""Hand-made payloads, built the way Xen's in-tree tests build theirs (spec §6), valid or not.

A payload here is: the author's C source (replacement functions, hook bodies) compiled with Xen's
flags; a C file holding ``struct livepatch_func`` initialisers in ``.livepatch.funcs`` (sizes
measured from the objects, as the in-tree Makefile does with ``nm -S``); note objects made with
``objcopy -I binary`` from a hypervisor's ``.note.gnu.build-id``; all linked with
``ld -r --build-id=sha1``.  Every knob that makes a payload invalid is a field of
:class:`PayloadSpec`, so a test states the one thing it breaks::

    hv = build_hypervisor(toolchain, tmp / "xen-syms")
    spec = PayloadSpec("hello", source=REPLACEMENT_C,
                       funcs=[FuncEntry("xen_extra_version", "hello_extra_version")])
    good = build_payload(toolchain, hv, spec, tmp / "hello.livepatch")
    bad = build_payload(toolchain, hv, replace(spec, omit={".livepatch.xen_depends"}), ...)

Function names on the hypervisor side use Xen's naming (``common/version.c#scale`` for a
static).  The default hypervisor is ``fixtures/handmade/version.c``; :func:`build_hypervisor`
links it like ``xen-syms`` at an address where the loader child can run it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.elffile import ELFFile

from tests.support.image import Image, build_image, note_section_bytes
from tests.support.toolchain import FIXTURES, LD, OBJCOPY, Toolchain, run
from xsbuild import xen_abi as abi
from xsbuild.sandbox.loader import IMAGE_BASE, ImageSymbol, read_image_symbols

HYPERVISOR_SOURCE = FIXTURES / "handmade" / "version.c"
HYPERVISOR_NAME = "common/version.c"

# A replacement for the default hypervisor's xen_extra_version, as xen_hello_world has one.
HELLO_SOURCE = """\
#include "xen.h"
static const char hello[] = "Hello World";
const char *livepatch_xen_extra_version(void)
{
    return hello;
}
"""


@dataclass
class FuncEntry:
    """One ``struct livepatch_func`` (spec §1.5).

    old:       the patched function's name in the hypervisor (``path#name`` for statics).
    new:       the replacement's symbol in the payload source; None makes a NOP entry.
    old_addr:  "reloc" (R_X86_64_64 against ``old``, resolved at load), "zero" (0: the loader
               resolves ``name``), or "absolute" (the value from the hypervisor's symtab).
    name:      the ``name`` string; defaults to ``old``; "" makes a NULL pointer.
    new_size / old_size: default to the symbols' sizes (``new_size`` is required for NOPs).
    version:   ``LIVEPATCH_PAYLOAD_VERSION`` unless a test breaks it.
    expect:    enabled expectation bytes (at most 31), or None.
    """

    old: str
    new: str | None = None
    old_addr: str = "reloc"
    name: str | None = None
    new_size: int | None = None
    old_size: int | None = None
    version: int = abi.LIVEPATCH_PAYLOAD_VERSION
    expect: bytes | None = None


@dataclass
class PayloadSpec:
    """Everything a hand-made payload contains; defaults give a valid payload.

    hooks:        ``{kind: [function names in source]}``; kinds from ``xen_abi.HOOK_KINDS``.
    depends / xen_depends: raw note bytes; None = the hypervisor's own build-id note.
    omit:         required sections to leave out (``.livepatch.depends``,
                  ``.livepatch.xen_depends``, ``.note.gnu.build-id``).
    modinfo:      ``.modinfo`` text (NUL-separated ``key=value``), or None.
    bad_reloc:    add a function using ``movl $xen_minor_version, %eax`` (R_X86_64_32).
    wx_section:   add a section that is both writable and executable.
    unresolved:   add a call to an undefined function of that name.
    funcs_flags:  objcopy ``--set-section-flags`` value for ``.livepatch.funcs`` (the 4.19 tests
                  use "alloc,readonly").
    extra_sources: more C sources linked in, ``{unique name: text}``.
    """

    name: str
    source: str = HELLO_SOURCE
    funcs: list[FuncEntry] = field(default_factory=lambda: [
        FuncEntry("xen_extra_version", "livepatch_xen_extra_version")])
    hooks: dict[str, list[str]] = field(default_factory=dict)
    depends: bytes | None = None
    xen_depends: bytes | None = None
    omit: frozenset[str] | set[str] = frozenset()
    modinfo: str | None = None
    bad_reloc: bool = False
    wx_section: bool = False
    unresolved: str | None = None
    funcs_flags: str | None = None
    extra_sources: dict[str, str] = field(default_factory=dict)


def build_hypervisor(toolchain: Toolchain, out: Path, base: int = IMAGE_BASE,
                     sources: dict[str, str] | None = None) -> Image:
    """Link a small "hypervisor" ELF (default: ``fixtures/handmade/version.c`` + thunks).

    Shaped like ``xen-syms`` (static ELF, symtab with STT_FILE, build-id).  At the default
    ``base`` the loader child can run it; ``base=XEN_LINK_BASE`` puts it at Xen's addresses.
    """
    if sources is None:
        sources = {HYPERVISOR_NAME: HYPERVISOR_SOURCE.read_text()}
    return build_image(toolchain, sources, out, base=base)


def build_id_note(desc: bytes, note_type: int = abi.NT_GNU_BUILD_ID,
                  name: bytes = abi.NOTE_NAME_GNU) -> bytes:
    """Raw ELF note bytes; change ``note_type`` or ``name`` to make a malformed note."""
    padded = name + b"\0" * (-len(name) % 4)
    return abi.NOTE_HEADER.pack(len(name), len(desc), note_type) + padded + desc


def binary_object(data: bytes, section: str, out: Path, flags: str) -> Path:
    """An object holding ``data`` as ``section``, the in-tree tests' objcopy recipe."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "data.bin"
        raw.write_bytes(data)
        run([OBJCOPY, "-I", "binary", "-O", "elf64-x86-64", "-B", "i386:x86-64",
             f"--rename-section=.data={section},{flags}", str(raw), str(out)])
    return out


def _symbol_sizes(obj: Path) -> dict[str, int]:
    with obj.open("rb") as fh:
        symtab = ELFFile(fh).get_section_by_name(".symtab")
        return {s.name: s["st_size"] for s in symtab.iter_symbols() if s.name}


def _c_bytes(data: bytes) -> str:
    return ", ".join(f"{b:#04x}" for b in data)


def _old_addr_expr(i: int, fn: FuncEntry, old: ImageSymbol | None) -> tuple[str, str | None]:
    """C expression for ``old_addr`` and the declaration it needs (None: none)."""
    if fn.old_addr == "reloc":
        # Xen names like common/version.c#scale are not C identifiers: reference a placeholder
        # and let objcopy rename the undefined symbol afterwards.
        return f"lp_old_{i}", f"extern char lp_old_{i}[];"
    if fn.old_addr == "absolute":
        if old is None:
            raise ValueError(f"{fn.old} is not in the hypervisor's symbol table")
        return f"(void *){old.value:#x}UL", None
    return "(void *)0", None


def _func_entry(i: int, fn: FuncEntry, old: ImageSymbol | None, new_sizes: dict[str, int]
                ) -> tuple[list[str], str]:
    """Declarations and the initialiser of one ``struct livepatch_func``."""
    decls = []
    name = fn.old if fn.name is None else fn.name
    if name:
        decls.append(f'static const char lp_name_{i}[] = "{name}";')
    old_addr, decl = _old_addr_expr(i, fn, old)
    if decl:
        decls.append(decl)
    if fn.new:
        decls.append(f"extern char {fn.new}[];")
    new_size = fn.new_size if fn.new_size is not None else new_sizes.get(fn.new or "", 0)
    old_size = fn.old_size if fn.old_size is not None else (old.size if old else 0)
    expect = ""
    if fn.expect is not None:
        expect = (f", .expect = {{ .enabled = 1, .len = {len(fn.expect)}, "
                  f".data = {{ {_c_bytes(fn.expect)} }} }}")
    entry = (f"    {{ .name = {f'lp_name_{i}' if name else '(void *)0'}, "
             f".new_addr = {fn.new or '(void *)0'}, .old_addr = {old_addr}, "
             f".new_size = {new_size}, .old_size = {old_size}, .version = {fn.version}"
             f"{expect} }},")
    return decls, entry


def _funcs_source(spec: PayloadSpec, hv_syms: dict[str, ImageSymbol], new_sizes: dict[str, int]
                  ) -> tuple[str, dict[str, str]]:
    """C text of the ``.livepatch.funcs`` array, and placeholder -> Xen name renames."""
    lines = ['#include "livepatch_payload.h"']
    entries: list[str] = []
    renames: dict[str, str] = {}
    for i, fn in enumerate(spec.funcs):
        decls, entry = _func_entry(i, fn, hv_syms.get(fn.old), new_sizes)
        lines.extend(d for d in decls if d not in lines)  # -Wredundant-decls is an error
        entries.append(entry)
        if fn.old_addr == "reloc":
            renames[f"lp_old_{i}"] = fn.old
    lines.append('struct livepatch_func __section(".livepatch.funcs") lp_funcs[] = {')
    lines.extend(entries)
    lines.append("};")
    return "\n".join(lines) + "\n", renames


def _hooks_source(hooks: dict[str, list[str]]) -> str:
    declared = sorted({n for names in hooks.values() for n in names if n})
    lines = [f"extern char {n}[];" for n in declared]
    for kind, names in hooks.items():
        if kind not in abi.HOOK_KINDS:
            raise ValueError(f"unknown hook kind {kind}")
        body = ", ".join(f"(void *){n}" if n else "(void *)0" for n in names)
        lines.append(f'void *lp_hooks_{kind}[] __section("{abi.HOOK_PREFIX}{kind}") = '
                     f"{{ {body} }};")
    return "\n".join(lines) + "\n"


BAD_RELOC_SOURCE = """\
unsigned int lp_bad_reloc(void);
unsigned int lp_bad_reloc(void)
{
    unsigned int v;
    /* An absolute 32-bit immediate: R_X86_64_32, which the loader refuses. */
    asm ( "movl $xen_minor_version, %0" : "=r" (v) );
    return v;
}
"""

WX_SOURCE = """\
asm ( ".pushsection .text.lp_wx, \\"awx\\", @progbits\\n\\tret\\n\\t.popsection" );
"""


def _unresolved_source(symbol: str) -> str:
    return (f"int {symbol}(void);\nint lp_calls_unresolved(void);\n"
            f"int lp_calls_unresolved(void)\n{{\n    return {symbol}() + 1;\n}}\n")


def _note_objects(spec: PayloadSpec, hv: Image, work: Path) -> list[Path]:
    hv_note = note_section_bytes(hv.path, abi.SEC_BUILD_ID)
    objects = []
    for section, data in ((abi.SEC_DEPENDS, spec.depends), (abi.SEC_XEN_DEPENDS,
                                                             spec.xen_depends)):
        if section in spec.omit:
            continue
        out = work / f"{section.strip('.').replace('.', '_')}.o"
        objects.append(binary_object(data if data is not None else hv_note, section, out,
                                     "alloc,load,readonly,data,contents"))
    if spec.modinfo is not None:
        objects.append(binary_object(spec.modinfo.encode() + b"\0", abi.SEC_MODINFO,
                                     work / "modinfo.o", "alloc,load,readonly,data,contents"))
    return objects


def _source_objects(toolchain: Toolchain, spec: PayloadSpec) -> list[Path]:
    sources = {f"livepatch/{spec.name}.c": spec.source, **spec.extra_sources}
    if spec.bad_reloc:
        sources[f"livepatch/{spec.name}_bad_reloc.c"] = BAD_RELOC_SOURCE
    if spec.wx_section:
        sources[f"livepatch/{spec.name}_wx.c"] = WX_SOURCE
    if spec.unresolved:
        sources[f"livepatch/{spec.name}_unresolved.c"] = _unresolved_source(spec.unresolved)
    if spec.hooks:
        sources[f"livepatch/{spec.name}_hooks.c"] = _hooks_source(spec.hooks)
    return [toolchain.compile_source(text, name) for name, text in sources.items()]


def build_payload(toolchain: Toolchain, hv: Image, spec: PayloadSpec, out: Path) -> Path:
    """Build ``out`` (a ``.livepatch`` file) from ``spec`` against hypervisor ``hv``.

    The file appears atomically; a tool failure raises ``ToolchainError`` and leaves no file.
    """
    objects = _source_objects(toolchain, spec)
    new_sizes: dict[str, int] = {}
    for obj in objects:
        new_sizes.update(_symbol_sizes(obj))
    hv_syms = read_image_symbols(hv.path)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        work = Path(tmp)
        if spec.funcs and abi.SEC_FUNCS not in spec.omit:
            text, renames = _funcs_source(spec, hv_syms, new_sizes)
            funcs_obj = work / "funcs.o"
            shutil.copyfile(toolchain.compile_source(text, f"livepatch/{spec.name}_funcs.c"),
                            funcs_obj)  # a copy: objcopy below must not touch the cache
            for placeholder, xen_name in renames.items():
                run([OBJCOPY, f"--redefine-sym={placeholder}={xen_name}", str(funcs_obj)])
            objects.append(funcs_obj)
        objects.extend(_note_objects(spec, hv, work))
        build_id = [] if abi.SEC_BUILD_ID in spec.omit else ["--build-id=sha1"]
        linked = work / "payload.o"
        run([LD, "-melf_x86_64", *build_id, "-r", "-o", str(linked), *map(str, objects)])
        if spec.funcs_flags:
            run([OBJCOPY, f"--set-section-flags={abi.SEC_FUNCS}={spec.funcs_flags}",
                 str(linked)])
        os.replace(linked, out)
    return out
