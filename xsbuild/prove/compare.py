"""The proof proper: equivalence of every carried function with the patched hypervisor's, and
completeness against the original's."""

from __future__ import annotations

import re
from collections.abc import Iterable

from xsbuild import xen_abi
from xsbuild.elf import Elf, Symbol
from xsbuild.prove.linked import LinkedImage, linked_unit
from xsbuild.prove.normal import Fragments, Unit, compare_units
from xsbuild.prove.payload import PayloadImage, payload_unit, table_fields
from xsbuild.prove.report import Difference, DiffKind, FunctionProof, ProofReport
from xsbuild.xensyms import parse_build_id_note

# ------------------------------------------------------------------------------------------
# The proof


def prove_images(payload: PayloadImage, patched: LinkedImage, orig: LinkedImage,
                 candidates: Iterable[str], report: ProofReport) -> ProofReport:
    """Equivalence of every function the payload carries with ``patched``, and completeness:
    the functions among ``candidates`` (every function of the objects the patched build
    recompiled) that differ between ``orig`` and ``patched`` are exactly the payload's."""
    report.payload_build_id = _payload_build_id(payload.elf)
    report.base_build_id = orig.build_id.hex()
    report.patched_build_id = patched.build_id.hex()
    if payload.xen_depends and payload.xen_depends != orig.build_id:
        report.reason = (f"the payload is for the hypervisor {payload.xen_depends.hex()}, not "
                         f"the base {orig.build_id.hex()}")
        return report
    patched.aliases = static_aliases(orig, patched)
    if patched.aliases:
        report.notes.append("renumbered static locals taken as the original's: " + ", ".join(
            f"{new} = {old}" for new, old in sorted(patched.aliases.items())))
    by_id = {id(s): n for n, s in payload.replaced.items()}
    units = {by_id.get(id(sym), name): (sym, payload_unit(payload, sym,
                                                          by_id.get(id(sym), name)))
             for name, sym in payload.functions.items()}
    carried: set[str] = set()
    for target, (sym, mine) in sorted(units.items()):
        proof = FunctionProof(target, "replaced" if id(sym) in by_id else "new")
        if proof.role == "replaced" or target not in orig.functions or _cold_part_of(
                target, by_id.values()):
            carried.add(target)
        else:
            # Hypervisor code that calls the function keeps calling the original: a changed
            # function must be replaced, a copy is not enough.  Only a .cold part is reached
            # from its parent alone, so a new copy of it serves the replaced parent.
            report.notes.append(f"{target}: the payload's copy does not replace the "
                                "hypervisor's function of that name (not in .livepatch.funcs)")
        proof.instructions, proof.fragments = len(mine.insns), len(mine.fragments)
        for kind, attr in ((DiffKind.ALTERNATIVE, "alternatives"), (DiffKind.EX_TABLE,
                           "ex_table"), (DiffKind.BUG_FRAME, "bug_frames")):
            setattr(proof, attr, sum(e.kind is kind for e in mine.entries))
        theirs = linked_unit(patched, target)
        if theirs is None:
            proof.differences.append(Difference(DiffKind.ABSENT, target))
        else:
            proof.differences += compare_units(mine, theirs)
        report.functions.append(proof)
    for name in sorted(set(payload.replaced) - carried):
        report.notes.append(f"{name}: replaced by a symbol that is not a payload function")
    changed_tables = prove_tables(payload, patched, orig, report)
    changed = changed_functions(orig, patched, candidates)
    for name in list(changed):  # a changed .cold part is reached only through its parent,
        parent = _cold_parent(name, patched)  # which must be replaced to reach the new one
        if parent is not None and parent not in changed:
            changed[parent] = f"its unlikely path {name} changed"
    for name, tables in unpromoted_readers(patched, candidates, changed_tables,
                                           carried).items():
        changed[name] = f"it reads {', '.join(tables)}, which the patch changes"
    report.changed_in_xen = sorted(changed)
    report.missing = [Difference(DiffKind.MISSING, n, detail=changed[n])
                      for n in sorted(set(changed) - carried)]
    extra = sorted(n for n in carried - set(changed) if n in payload.replaced)
    for name in list(extra):  # a reader of a changed table the payload carries: promoted
        read = sorted(referenced(units[name][1]) & set(changed_tables))
        if read:
            extra.remove(name)
            report.promoted[name] = read
    report.extra = [Difference(DiffKind.EXTRA, n) for n in extra]
    report.decide()
    return report


_WITH_OFFSET = re.compile(r"^(.*?)(?:[+-]0x[0-9a-f]+)?$")


def referenced(unit: Unit) -> set[str]:
    """The symbols a function's instructions designate (offsets dropped)."""
    return {_WITH_OFFSET.match(name).group(1)  # type: ignore[union-attr]
            for insn in unit.insns for ref in insn.refs for name in ref}


def unpromoted_readers(patched: LinkedImage, candidates: Iterable[str],
                       changed_tables: dict[str, str], carried: set[str]) -> dict[str, list[str]]:
    """Functions of the patched hypervisor that read a changed table the payload carries but
    that the payload does not replace: they would go on reading the old table.  A static
    table is read only from its own file; a global one may be read from any rebuilt object."""
    out: dict[str, list[str]] = {}
    for name in sorted(set(candidates) - carried):
        sym = patched.functions.get(name)
        if not changed_tables or sym is None or patched.is_init(sym.addr):
            continue
        mine = [t for t in changed_tables if "#" not in t or t.partition("#")[0] ==
                name.partition("#")[0] or "#" not in name]
        if not mine:
            continue
        unit = linked_unit(patched, name)
        read = sorted(referenced(unit) & set(mine)) if unit is not None else []
        if read:
            out[name] = read
    return out


def prove_tables(payload: PayloadImage, patched: LinkedImage, orig: LinkedImage,
                 report: ProofReport) -> dict[str, str]:
    """Each read-only table the payload carries against the patched hypervisor's of that name
    (bytes, and pointers by what they point at); returns those the patch changed (their bytes
    differ between the two hypervisors: the readers the payload replaces for them are due)."""
    changed: dict[str, str] = {}
    for name, sym in sorted(payload.tables.items()):
        proof = FunctionProof(name, "table")
        theirs = patched.syms.lookup(name)
        if theirs is None or theirs.is_func:
            proof.differences.append(Difference(DiffKind.ABSENT, name))
        else:
            proof.differences += compare_table(sym, theirs.addr, theirs.size, patched, name)
        report.functions.append(proof)
        old = orig.syms.lookup(name)
        if old is None:
            changed[name] = "new in the patched hypervisor"
        elif theirs is not None and (old.size != theirs.size or orig.read(old.addr, old.size)
                                     != patched.read(theirs.addr, theirs.size)):
            changed[name] = "its bytes differ"
    return changed


def compare_table(sym: Symbol, addr: int, size: int, patched: LinkedImage,
                  name: str) -> list[Difference]:
    """A payload data object against the linked one at ``addr``: same size, same bytes outside
    relocated fields, and each relocated field pointing at the same thing."""
    assert sym.sec is not None
    if sym.size != size:
        return [Difference(DiffKind.DATA, name, None, f"{sym.size} bytes", f"{size} bytes",
                           "the sizes differ")]
    mine = bytes(sym.sec.data[sym.value:sym.value + size])
    theirs = patched.read(addr, size)
    masked = bytearray(mine), bytearray(theirs)
    frags = Fragments()
    for off, width, rtype, ref in table_fields(sym):
        raw = theirs[off:off + width]
        value = int.from_bytes(raw, "little", signed=width == 4 and rtype != xen_abi.R_X86_64_32)
        target = addr + off + value if xen_abi.is_pc_relative(rtype) else value
        linked = patched.target_ref(target, 0, frags)
        if not set(ref) & set(linked):
            return [Difference(DiffKind.DATA, name, off, "<" + "|".join(ref) + ">",
                               "<" + "|".join(linked) + ">", "a pointer differs")]
        for m in masked:
            m[off:off + width] = bytes(width)
    if masked[0] != masked[1]:
        at = next(i for i, (a, b) in enumerate(zip(*masked, strict=True)) if a != b)
        return [Difference(DiffKind.DATA, name, at, mine[at:at + 8].hex(),
                           theirs[at:at + 8].hex(), "the bytes differ")]
    return []


_STATIC_LOCAL = re.compile(r"^(.+#[^#]+)\.(\d+)$")


def static_aliases(orig: LinkedImage, patched: LinkedImage) -> dict[str, str]:
    """Static locals gcc renumbered (``f.c#count.0`` -> ``f.c#count.1``, its counter is shared
    by every static local of the file): when a file has as many ``base.N`` data symbols in
    both hypervisors, the k-th by address in the patched one continues the k-th in the
    original (the differ binds the payload to the running hypervisor's, whose state carries
    over).  Only differing names are returned; a static added or removed maps nothing."""
    def groups(image: LinkedImage) -> dict[str, list[str]]:
        out: dict[str, list[tuple[int, str]]] = {}
        for name, sym in image.syms.by_name.items():
            m = _STATIC_LOCAL.match(name)
            if m and not sym.is_func and sym.is_local:
                out.setdefault(m.group(1), []).append((sym.addr, name))
        return {base: [n for _a, n in sorted(v)] for base, v in out.items()}

    old = groups(orig)
    aliases: dict[str, str] = {}
    for base, names in groups(patched).items():
        before = old.get(base, [])
        if len(before) == len(names):
            aliases.update((new, was) for new, was in zip(names, before, strict=True)
                           if new != was)
    return aliases


def _cold_part_of(name: str, replaced: Iterable[str]) -> bool:
    """``foo.cold`` (gcc's split-off unlikely path) of a replaced ``foo`` (the parent may be
    global, the part is always local: compared without the ``file#``)."""
    parent, dot, suffix = name.rpartition(".cold")
    bare = {r.rpartition("#")[2] for r in replaced}
    return bool(dot) and suffix.strip(".0123456789") == "" and (
        parent in set(replaced) or parent.rpartition("#")[2] in bare)


def _cold_parent(name: str, image: LinkedImage) -> str | None:
    parent, dot, suffix = name.rpartition(".cold")
    if not dot or suffix.strip(".0123456789"):
        return None
    for cand in (parent, parent.rpartition("#")[2]):
        if cand in image.functions:
            return cand
    return None


def _payload_build_id(elf: Elf) -> str:
    note = elf.section(xen_abi.SEC_BUILD_ID)
    return parse_build_id_note(note.data).hex() if note is not None else ""


def changed_functions(orig: LinkedImage, patched: LinkedImage,
                      candidates: Iterable[str]) -> dict[str, str]:
    """Functions among ``candidates`` whose normal form differs between the two hypervisors
    (bug-frame line numbers aside), init code excluded; name -> what differs."""
    out: dict[str, str] = {}
    for name in sorted(set(candidates)):
        new = patched.functions.get(name)
        if new is None or patched.is_init(new.addr):
            continue
        old = orig.functions.get(name)
        if old is None:
            out[name] = "new in the patched hypervisor"
            continue
        a, b = linked_unit(orig, name), linked_unit(patched, name)
        assert a is not None and b is not None
        diffs = compare_units(a, b, lines=False, exact=True)
        if diffs:
            d = diffs[0]
            at = f" at +{d.offset:#x}" if d.offset is not None else ""
            out[name] = f"{d.kind}{at}: `{d.payload}` -> `{d.xen}`"
    return out


