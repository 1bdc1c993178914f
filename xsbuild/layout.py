"""Struct-layout changes: a patch must not change the layout of a type that live data has.

Every live instance of a struct keeps the layout it was allocated with, and every function the
payload does not replace keeps the old member offsets.  A fix that adds, removes, retypes or
moves a member, or changes a struct's size, therefore cannot be live-patched as it stands, even
though its payload would load.  The compiler knows the layouts: the build compiles a few of the
affected translation units a second time with ``-g`` into scratch (the payload's objects stay
exactly as the tree builds them; :mod:`xsbuild.capture` does that) and this module compares the
DWARF of the original and patched versions.

STEP 1  read every named struct and union (and anonymous ones behind a typedef) with its size and
        members, anonymous member structs and unions flattened into their parent
        (:func:`read_layouts`).
STEP 2  compare the types both sides define (:func:`compare_layouts`); a type only one side has
        is new or gone, which is fine.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from xsbuild.errors import UsageError

# DWARF tags and attributes as pyelftools names them.
_RECORD_TAGS = {"DW_TAG_structure_type": "struct", "DW_TAG_union_type": "union"}
_SKIP_TAGS = {"DW_TAG_typedef", "DW_TAG_const_type", "DW_TAG_volatile_type",
              "DW_TAG_atomic_type", "DW_TAG_restrict_type"}


class ChangeKind(StrEnum):
    SIZE = "size"  # the type's size changed
    ADDED = "added"  # a member that was not there
    REMOVED = "removed"
    MOVED = "moved"  # same member, other offset
    RESIZED = "resized"  # same member, other size
    RETYPED = "retyped"  # same member, offset and size, other type


@dataclass(frozen=True, slots=True)
class Member:
    """One data member; ``offset`` and ``size`` are in bits, so bit-fields compare exactly."""

    name: str
    offset: int
    size: int
    type_name: str


@dataclass(frozen=True, slots=True)
class TypeLayout:
    """A struct or union as the compiler laid it out."""

    key: str  # "struct domain", "union foo", "typedef foo_t" (an anonymous struct)
    size: int  # bytes
    members: tuple[Member, ...]
    decl: str  # "include/xen/sched.h:370", or "" when DWARF does not say

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True, slots=True)
class LayoutChange:
    """One difference between the original and patched layout of a type."""

    type_key: str
    kind: ChangeKind
    member: str  # "" for a change of the type's size
    old: str  # "offset 16, size 8" (bytes; bits where a bit-field is involved), or ""
    new: str
    decl: str
    obj: str = ""  # the object whose DWARF showed it

    def describe(self) -> str:
        where = f" ({self.decl})" if self.decl else ""
        if self.kind is ChangeKind.SIZE:
            what = f"size changes from {self.old} to {self.new}"
        elif self.kind is ChangeKind.ADDED:
            what = f"member {self.member} added at {self.new}"
        elif self.kind is ChangeKind.REMOVED:
            what = f"member {self.member} removed (was at {self.old})"
        else:
            what = f"member {self.member} {self.kind.value}: {self.old} -> {self.new}"
        return f"{self.type_key}{where}: {what}"

    def to_json(self) -> dict[str, str]:
        return {"type": self.type_key, "kind": self.kind.value, "member": self.member,
                "old": self.old, "new": self.new, "declared": self.decl, "object": self.obj}


# ------------------------------------------------------------------------------------------
# STEP 1: reading


def read_layouts(obj: Path) -> dict[str, TypeLayout]:
    """Every complete named struct/union of ``obj``'s DWARF (an object compiled with ``-g``)."""
    from elftools.common.exceptions import DWARFError, ELFError
    from elftools.elf.elffile import ELFFile

    layouts: dict[str, TypeLayout] = {}
    try:
        with obj.open("rb") as f:
            elf = ELFFile(f)
            if not elf.has_dwarf_info():
                raise UsageError(f"{obj}: no DWARF (compiled without -g?)")
            dwarf = elf.get_dwarf_info()
            for cu in dwarf.iter_CUs():
                files = _file_names(dwarf, cu)
                for die in cu.iter_DIEs():
                    layout = _layout_of(die, files)
                    if layout is not None:
                        layouts.setdefault(layout.key, layout)
    except (OSError, ELFError, DWARFError) as exc:
        raise UsageError(f"{obj}: cannot read its DWARF: {exc}") from exc
    return layouts


def _file_names(dwarf: object, cu: object) -> list[str]:
    """The line program's file table, indexed as DW_AT_decl_file counts (DWARF 5 from 0)."""
    lineprog = dwarf.line_program_for_CU(cu)  # type: ignore[attr-defined]
    if lineprog is None:
        return []
    version = lineprog.header["version"]
    dirs = [d if isinstance(d, bytes) else d.DW_LNCT_path
            for d in lineprog.header.get("include_directory", [])]
    names = []
    for entry in lineprog.header["file_entry"]:
        name = entry.name if hasattr(entry, "name") else entry.DW_LNCT_path
        index = entry.dir_index if hasattr(entry, "dir_index") else entry.DW_LNCT_directory_index
        path = name.decode(errors="replace")
        if not path.startswith("/") and index < len(dirs) and (version >= 5 or index > 0):
            base = dirs[index].decode(errors="replace")
            path = path if base in (".", "") else f"{base}/{path}"
        names.append(path.removeprefix("./"))
    return names if version >= 5 else ["", *names]


def _layout_of(die: object, files: list[str]) -> TypeLayout | None:
    tag = die.tag  # type: ignore[attr-defined]
    attrs = die.attributes  # type: ignore[attr-defined]
    if tag == "DW_TAG_typedef":
        target = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in attrs else None  # type: ignore[attr-defined]
        if target is None or target.tag not in _RECORD_TAGS or "DW_AT_name" in target.attributes:
            return None
        return _record(target, f"typedef {_name(die)}", files)
    if tag not in _RECORD_TAGS or "DW_AT_name" not in attrs:
        return None
    if "DW_AT_declaration" in attrs:
        return None  # an incomplete "struct foo;": no layout here
    return _record(die, f"{_RECORD_TAGS[tag]} {_name(die)}", files)


def _record(die: object, key: str, files: list[str]) -> TypeLayout | None:
    attrs = die.attributes  # type: ignore[attr-defined]
    if "DW_AT_byte_size" not in attrs:
        return None
    decl = ""
    if "DW_AT_decl_file" in attrs and "DW_AT_decl_line" in attrs:
        index = attrs["DW_AT_decl_file"].value
        if 0 <= index < len(files) and files[index]:
            decl = f"{files[index]}:{attrs['DW_AT_decl_line'].value}"
    members = tuple(_members(die, 0, ""))
    return TypeLayout(key, attrs["DW_AT_byte_size"].value, members, decl)


def _members(die: object, base_bits: int, prefix: str) -> list[Member]:
    out: list[Member] = []
    for child in die.iter_children():  # type: ignore[attr-defined]
        if child.tag != "DW_TAG_member":
            continue
        attrs = child.attributes
        offset = base_bits + _member_offset_bits(attrs)
        target = child.get_DIE_from_attribute("DW_AT_type")
        if "DW_AT_name" not in attrs:
            if target.tag in _RECORD_TAGS:
                out.extend(_members(target, offset, prefix))  # anonymous struct/union: flatten
            continue  # an unnamed bit-field ("unsigned int :3;") is padding, holding nothing
        name = prefix + _name(child)
        size = attrs["DW_AT_bit_size"].value if "DW_AT_bit_size" in attrs else \
            8 * _type_size(target)
        out.append(Member(name, offset, size, type_name(target)))
    return out


def _member_offset_bits(attrs: dict[str, object]) -> int:
    if "DW_AT_data_bit_offset" in attrs:
        return attrs["DW_AT_data_bit_offset"].value  # type: ignore[attr-defined]
    loc = attrs.get("DW_AT_data_member_location")
    return 8 * loc.value if loc is not None and isinstance(loc.value, int) else 0  # type: ignore[attr-defined]


def _type_size(die: object) -> int:
    """Bytes of a type, following typedefs and qualifiers; arrays multiply their bounds."""
    seen = 0
    while die is not None and seen < 32:
        attrs = die.attributes  # type: ignore[attr-defined]
        if "DW_AT_byte_size" in attrs:
            return attrs["DW_AT_byte_size"].value
        if die.tag == "DW_TAG_array_type":  # type: ignore[attr-defined]
            count = 1
            for sub in die.iter_children():  # type: ignore[attr-defined]
                count *= _subrange_count(sub)
            return count * _type_size(die.get_DIE_from_attribute("DW_AT_type"))  # type: ignore[attr-defined]
        if "DW_AT_type" not in attrs:
            return 0
        die = die.get_DIE_from_attribute("DW_AT_type")  # type: ignore[attr-defined]
        seen += 1
    return 0


def _subrange_count(sub: object) -> int:
    attrs = sub.attributes  # type: ignore[attr-defined]
    if "DW_AT_count" in attrs:
        return attrs["DW_AT_count"].value
    if "DW_AT_upper_bound" in attrs:
        return attrs["DW_AT_upper_bound"].value + 1
    return 0  # a flexible array member


def type_name(die: object, depth: int = 0) -> str:
    """A C-like spelling of a type, enough to tell two member types apart."""
    if die is None or depth > 16:
        return "void"
    tag = die.tag  # type: ignore[attr-defined]
    attrs = die.attributes  # type: ignore[attr-defined]
    inner = die.get_DIE_from_attribute("DW_AT_type") if "DW_AT_type" in attrs else None  # type: ignore[attr-defined]
    if tag == "DW_TAG_pointer_type":
        return type_name(inner, depth + 1) + " *"
    if tag == "DW_TAG_array_type":
        dims = "".join(f"[{_subrange_count(s)}]" for s in die.iter_children())  # type: ignore[attr-defined]
        return type_name(inner, depth + 1) + dims
    if tag in _SKIP_TAGS and tag != "DW_TAG_typedef":
        return tag.removeprefix("DW_TAG_").removesuffix("_type") + " " + type_name(inner, depth + 1)
    if tag == "DW_TAG_subroutine_type":
        return "function"
    prefix = {"DW_TAG_structure_type": "struct ", "DW_TAG_union_type": "union ",
              "DW_TAG_enumeration_type": "enum "}.get(tag, "")
    return prefix + (_name(die) if "DW_AT_name" in attrs else "<anonymous>")


def _name(die: object) -> str:
    value = die.attributes["DW_AT_name"].value  # type: ignore[attr-defined]
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------
# STEP 2: comparing


def compare_layouts(old: dict[str, TypeLayout], new: dict[str, TypeLayout],
                    obj: str = "") -> list[LayoutChange]:
    """Every layout difference of the types both sides define, in a stable order."""
    changes: list[LayoutChange] = []
    for key in sorted(old.keys() & new.keys()):
        changes.extend(_type_changes(old[key], new[key], obj))
    return changes


def _type_changes(a: TypeLayout, b: TypeLayout, obj: str) -> list[LayoutChange]:
    decl = b.decl or a.decl
    out = []
    if a.size != b.size:
        out.append(LayoutChange(a.key, ChangeKind.SIZE, "", f"{a.size} bytes", f"{b.size} bytes",
                                decl, obj))
    for m in a.members:
        n = b.member(m.name)
        if n is None:
            out.append(LayoutChange(a.key, ChangeKind.REMOVED, m.name, _place(m), "", decl, obj))
        elif n.offset != m.offset:
            out.append(LayoutChange(a.key, ChangeKind.MOVED, m.name, _place(m), _place(n), decl,
                                    obj))
        elif n.size != m.size:
            out.append(LayoutChange(a.key, ChangeKind.RESIZED, m.name, _place(m), _place(n),
                                    decl, obj))
        elif n.type_name != m.type_name:
            out.append(LayoutChange(a.key, ChangeKind.RETYPED, m.name, m.type_name, n.type_name,
                                    decl, obj))
    out.extend(LayoutChange(a.key, ChangeKind.ADDED, n.name, "", _place(n), decl, obj)
               for n in b.members if a.member(n.name) is None)
    return out


def _place(m: Member) -> str:
    if m.offset % 8 or m.size % 8:
        return f"bit offset {m.offset}, {m.size} bits"
    return f"offset {m.offset // 8}, size {m.size // 8}"


@dataclass(frozen=True, slots=True)
class DebugPair:
    """One object compiled with ``-g``, before and after the patch (from the capture)."""

    obj: str
    orig: Path
    patched: Path


# The order a type's changes are told in: its size, then what the patch did to members, then
# what followed from it (members that merely moved).
_TELLING_ORDER = [ChangeKind.SIZE, ChangeKind.ADDED, ChangeKind.REMOVED, ChangeKind.RESIZED,
                  ChangeKind.RETYPED, ChangeKind.MOVED]


def layout_changes(pairs: list[DebugPair]) -> list[LayoutChange]:
    """The layout changes all pairs show, each (type, member, kind) reported once, each type's
    cause first (size, added, removed, resized, retyped, then moved members)."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for pair in pairs:
        for change in compare_layouts(read_layouts(pair.orig), read_layouts(pair.patched),
                                      pair.obj):
            ident = (change.type_key, change.member, change.kind.value)
            if ident not in seen:
                seen.add(ident)
                out.append(change)
    types = list(dict.fromkeys(c.type_key for c in out))
    return sorted(out, key=lambda c: (types.index(c.type_key), _TELLING_ORDER.index(c.kind)))
