"""The proof proper: equivalence of every carried function with the patched hypervisor's, and
completeness against the original's."""

from __future__ import annotations

import re
from collections.abc import Iterable

from xsbuild import xen_abi
from xsbuild.elf import Elf
from xsbuild.prove.linked import LinkedImage, linked_unit
from xsbuild.prove.normal import compare_units
from xsbuild.prove.payload import PayloadImage, payload_unit
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
    changed = changed_functions(orig, patched, candidates)
    for name in list(changed):  # a changed .cold part is reached only through its parent,
        parent = _cold_parent(name, patched)  # which must be replaced to reach the new one
        if parent is not None and parent not in changed:
            changed[parent] = f"its unlikely path {name} changed"
    report.changed_in_xen = sorted(changed)
    report.missing = [Difference(DiffKind.MISSING, n, detail=changed[n])
                      for n in sorted(set(changed) - carried)]
    report.extra = [Difference(DiffKind.EXTRA, n) for n in sorted(carried - set(changed))
                    if n in payload.replaced]
    report.decide()
    return report


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


