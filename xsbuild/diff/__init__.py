"""Compare an original and a patched object function by function: the driver of the passes.

:func:`diff_objects` builds one :class:`~xsbuild.diff.model.DiffContext` and runs over it:

1. :func:`check_inputs`: the objects belong together (same translation unit, split sections, a
   symbol table);
2. :mod:`~xsbuild.diff.correlate`: list the *units* of each side (every function and data
   object) and link every patched unit to its original twin (name, then static locals by the
   functions that use them, then compiler clones such as ``foo.constprop.1`` by their demangled
   name);
3. :mod:`~xsbuild.diff.compare`: fingerprint every unit position-independently
   (:mod:`xsbuild.relocs`: relocation targets as symbol + delta, strings by content) and classify
   it SAME, CHANGED or NEW;
4. :mod:`~xsbuild.diff.select`: refuse what cannot be live-patched (changed data, ``__init``
   code, used statics that lost their twin, with one message per problem naming object, section
   and symbol) and choose what the payload carries (changed functions, the new things they
   reach, hooks).

:func:`diff_files` then runs :mod:`~xsbuild.diff.clone`, which cuts the chosen units out of the
patched object into the diff object that ``xsbuild link`` consumes.  After correlation no pass
looks a symbol up by name again: twins are explicit links on the units.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from xsbuild.diff.asm import add_missing_relocations, is_assembly, residue_refusals
from xsbuild.diff.compare import compare, ignored_sections
from xsbuild.diff.correlate import correlate, list_units
from xsbuild.diff.model import (
    Change,
    ChangeKind,
    DiffContext,
    DiffResult,
    Outcome,
    Side,
    Status,
    Unit,
    unit_targets,
    xen_name,
)
from xsbuild.diff.select import select
from xsbuild.elf import SHN_ABS, STB_LOCAL, STT_FILE, STT_FUNC, Elf, Symbol, read_elf
from xsbuild.errors import InputMismatchError, UnsupportedChangeError

__all__ = ["Change", "ChangeKind", "DiffContext", "DiffResult", "Outcome", "Side", "Status",
           "Unit", "check_inputs", "diff_files", "diff_objects", "list_units", "unit_targets",
           "xen_name"]


def diff_files(orig: str | os.PathLike[str], patched: str | os.PathLike[str],
               out: str | os.PathLike[str] | None = None, *,
               allow_new_statics: Iterable[str] = ()) -> DiffContext:
    """Diff two object files; when something changed, write the diff object to ``out``.

    Raises :class:`UnsupportedChangeError` when the change cannot be live-patched (nothing is
    written then), :class:`xsbuild.errors.UsageError` subclasses for bad input.
    """
    ctx = diff_objects(read_elf(orig), read_elf(patched), label=str(patched),
                       allow_new_statics=allow_new_statics)
    if ctx.refused:
        raise UnsupportedChangeError(ctx.refused)
    if out is not None and ctx.status == Outcome.CHANGED:
        from xsbuild.diff.clone import clone
        from xsbuild.elf import elf_bytes, write_atomic

        write_atomic(out, elf_bytes(clone(ctx, Path(out).name)))
    return ctx


def diff_objects(orig: Elf, patched: Elf, *, label: str = "",
                 allow_new_statics: Iterable[str] = ()) -> DiffContext:
    """Run the passes over two parsed objects; the context holds every decision."""
    ctx = DiffContext(object=label or patched.path, orig=orig, patched=patched,
                      allow_new_statics=set(allow_new_statics))
    assembly = is_assembly(patched)  # before name_fileless gives it a FILE symbol
    name_fileless(orig, patched)
    check_inputs(orig, patched, ctx.object)
    if assembly:  # cut apart functions sharing a section (xsbuild/diff/asm.py)
        add_missing_relocations(orig)
        uncuttable = add_missing_relocations(patched)
    ctx.ignored_sections = ignored_sections(patched)
    correlate(ctx)
    compare(ctx)
    select(ctx)
    if assembly:
        ctx.refused += residue_refusals(ctx)
        ctx.refused += [f"{ctx.object}: {uncuttable[u.name]}" for u in ctx.included
                        if u.name in uncuttable]
    return ctx


def name_fileless(orig: Elf, patched: Elf) -> None:
    """Give an object without an STT_FILE symbol (assembly without ``.file``, such as Xen's
    ``arch/x86/boot/head.o``, or a generated one such as ``common/config_data.o``) the FILE
    symbol the linker gives it in ``xen-syms``: the object's file name, so its statics are
    ``head.o#multiboot1_header`` there (spec §7) and here alike."""
    if orig.file_symbols() or patched.file_symbols():
        return
    name = Path(orig.path).name
    for elf in (orig, patched):
        elf.symbols.insert(1, Symbol(name=name, type=STT_FILE, shndx=SHN_ABS))
        for sym in elf.symbols:
            if sym.bind == STB_LOCAL and not sym.is_file and not sym.is_section:
                sym.file = name


def check_inputs(orig: Elf, patched: Elf, label: str) -> None:
    of, pf = orig.file_symbols(), patched.file_symbols()
    if not pf:
        raise InputMismatchError(f"{label}: no STT_FILE symbol: a stripped object, or assembly "
                                 "without a .file directive; xsbuild needs the compiler's object "
                                 "with its full symbol table")
    if of[:1] != pf[:1]:
        raise InputMismatchError(
            f"{label}: objects of different translation units: {of[0] if of else '(none)'!r} vs "
            f"{pf[0]!r}")
    for elf in (orig, patched):
        for sec in elf.sections:
            funcs = [s for s in sec.symbols if s.type == STT_FUNC]
            if sec.name == ".text" and len(funcs) > 1 and _compiled_from_c(elf):
                raise InputMismatchError(
                    f"{elf.path}: functions share section .text: build with "
                    "-ffunction-sections -fdata-sections (Xen does with CONFIG_LIVEPATCH)")


def _compiled_from_c(elf: Elf) -> bool:
    files = elf.file_symbols()
    return bool(files) and files[0].endswith(".c")
