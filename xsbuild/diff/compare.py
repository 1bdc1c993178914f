"""Pass 2: decide for every patched unit whether it is SAME, CHANGED or NEW.

Each unit is fingerprinted position-independently (its bytes with every relocated field zeroed);
when the fingerprints agree, its relocations are compared by what they point at
(:mod:`xsbuild.relocs`: symbol + delta, strings by content), patched-side symbols by their twin's
name, so that a renumbered static or a renamed clone compares equal.  Units named in
``.livepatch.ignore.functions`` or living in a section named in ``.livepatch.ignore.sections``
count as unchanged, whatever their bytes say.
"""

from __future__ import annotations

import hashlib
import logging

from xsbuild import xen_abi
from xsbuild.diff.model import (
    Change,
    ChangeKind,
    DiffContext,
    Side,
    Status,
    Unit,
    demangle,
    is_special_static,
    pc_adjust,
)
from xsbuild.elf import Elf
from xsbuild.relocs import Target, field_width, target_of

log = logging.getLogger(__name__)

# A relocation as both sides can agree on: (offset in unit, type, kind, name or content, ...).
RelocKey = tuple[object, ...]


def compare(ctx: DiffContext) -> None:
    """Fingerprint both sides, apply the ignore marks, and classify every patched unit."""
    for u in ctx.orig_units:
        u.fingerprint = fingerprint(u)
    for u in ctx.units:
        u.fingerprint = fingerprint(u)
    mark_ignored_functions(ctx)
    classify(ctx)


# --------------------------------------------------------------------------------------------
# Ignore marks (.livepatch.ignore.functions / .sections)


def _pointer_targets(elf: Elf, secname: str) -> list[Target]:
    sec = elf.section(secname)
    if sec is None:
        return []
    return [target_of(r) for r in sec.relocs if r.type == xen_abi.R_X86_64_64]


def ignored_sections(patched: Elf) -> set[str]:
    """The section names listed in the patched object's ``.livepatch.ignore.sections``."""
    return {t.content.rstrip(b"\0").decode() for t in
            _pointer_targets(patched, xen_abi.SEC_IGNORE_SECTIONS) if t.kind == "string"}


def mark_ignored_functions(ctx: DiffContext) -> None:
    for u in ctx.units:
        if u.sec.name in ctx.ignored_sections:
            u.ignored = True
    for t in _pointer_targets(ctx.patched, xen_abi.SEC_IGNORE_FUNCTIONS):
        u = ctx.unit_of.get(t.sym) if t.kind == "sym" and t.sym is not None else None
        if u is not None:
            u.ignored = True
            for child in u.children:
                child.ignored = True


# --------------------------------------------------------------------------------------------
# Fingerprints and classification


def masked_body(u: Unit) -> bytes:
    """The unit's bytes with every relocated field zeroed."""
    body = bytearray(u.body())
    for r in u.relocs():
        off = r.offset - u.sym.value
        width = field_width(r.type)
        body[off:off + width] = b"\0" * min(width, len(body) - off)
    return bytes(body)


def fingerprint(u: Unit) -> bytes:
    """Digest of a unit's size and masked bytes: the cheap first comparison."""
    h = hashlib.blake2b(digest_size=16)
    h.update(u.sym.size.to_bytes(8, "little"))
    h.update(masked_body(u))
    return h.digest()


def canonical(ctx: DiffContext, t: Target, side: Side) -> tuple[object, ...]:
    """A target as both sides can agree on: patched-side symbols by their twin's name."""
    if t.kind == "sym":
        sym = t.sym
        assert sym is not None
        name = sym.name
        unit = ctx.unit_of.get(sym) if side == Side.PATCHED else None
        if is_special_static(name):
            name = "special:" + demangle(name)
        elif unit is not None:
            name = unit.twin.name if unit.twin else "new:" + name
        return ("sym", name, t.delta)
    if t.kind in ("string", "const"):
        return (t.kind, t.content, t.delta)
    assert t.section is not None
    return ("anon", t.section.name, t.delta,
            hashlib.blake2b(bytes(t.section.data), digest_size=8).digest())


def reloc_keys(ctx: DiffContext, u: Unit) -> list[RelocKey]:
    """Each relocation of ``u`` as (offset in unit, type, canonical target)."""
    return [(r.offset - u.sym.value, r.type, *canonical(ctx, t, u.side))
            for r, t in ctx.targets(u)]


def classify(ctx: DiffContext) -> None:
    for u in ctx.units:
        if u.twin is None:
            u.status, u.reason = Status.NEW, "new"
            continue
        if u.ignored:
            u.status, u.reason = Status.SAME, "ignored (.livepatch.ignore.functions/.sections)"
            continue
        u.change = first_difference(ctx, u.twin, u)
        u.reason = u.change.text if u.change else ""
        u.status = Status.CHANGED if u.change else Status.SAME
    # A changed .cold part is only reached through its parent: the parent must be replaced.
    for u in ctx.units:
        if u.parent is not None and u.status == Status.CHANGED \
                and u.parent.status == Status.SAME and not u.parent.ignored:
            u.parent.status = Status.CHANGED
            u.parent.reason = f"its cold part {u.name} changed: {u.reason}"
    for u in ctx.units:
        if u.status != Status.SAME:
            log.debug("compare: %s %s: %s", u.name, u.status, u.reason)


def first_difference(ctx: DiffContext, o: Unit, p: Unit) -> Change | None:
    """Where ``p`` first differs from its twin ``o``; None when they are the same."""
    what = "code" if p.is_func else "contents"
    if o.fingerprint != p.fingerprint:
        ob, pb = masked_body(o), masked_body(p)
        at = next((i for i, (a, b) in enumerate(zip(ob, pb, strict=False)) if a != b),
                  min(len(ob), len(pb)))
        size = f" (size {o.sym.size:#x} -> {p.sym.size:#x})" if o.sym.size != p.sym.size else ""
        return Change(ChangeKind.CODE, at, f"{what} differs at +{at:#x}{size}")
    ok, pk = reloc_keys(ctx, o), reloc_keys(ctx, p)
    for a, b, ro, rp in zip(ok, pk, o.relocs(), p.relocs(), strict=False):
        if a != b:
            new = describe(b, pc_adjust(p, rp, ctx.ends))
            old = describe(a, pc_adjust(o, ro, ctx.ends))
            return Change(ChangeKind.RELOCATION, int(b[0]),  # type: ignore[call-overload]
                          f"relocation at +{b[0]:#x} now points to {new} (was {old})")
    if len(ok) != len(pk):
        return Change(ChangeKind.COUNT, None, f"relocations differ ({len(ok)} -> {len(pk)})")
    return None


def describe(key: RelocKey, pc: int) -> str:
    """A canonical target in words; ``pc`` turns a PC-relative addend into the real offset."""
    kind = key[2]
    if kind in ("string", "const"):
        content = key[3]
        assert isinstance(content, bytes)
        text = content.rstrip(b"\0").decode("utf-8", "replace")
        return f"string {text!r}" if kind == "string" else f"constant {content.hex()}"
    name, delta = key[3], int(key[4]) + pc  # type: ignore[call-overload]
    return f"{name}{delta:+#x}" if delta else str(name)
