"""Pass 4: clone what the diff chose out of the patched object into a new, self-describing
object (the diff object).

Symbol-centric (as objtool's klp-diff clones symbols rather than sections): each included
function or object gets a section of its own holding only its bytes; each string literal or merged
constant it uses is copied individually; each special-section entry (alternatives, exception
table, bug frames) is kept only when it belongs to an included function, together with the
replacement code or fixup fragment it points at.  Everything left in the hypervisor is referenced
by its name in the hypervisor's table (statics as ``path#name``).

The changed functions are listed in ``.livepatch.funcs`` (name and new_addr relocated, old_addr
and old_size left 0 for ``xsbuild link`` to fill from ``xen-syms``), so the diff object is itself
a valid ``ld -r`` input and carries everything the linker needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from xsbuild import xen_abi
from xsbuild.diff.model import DiffContext, Status, Unit, xen_name
from xsbuild.elf import (
    SHF_ALLOC,
    SHF_EXECINSTR,
    SHF_MERGE,
    SHF_STRINGS,
    SHF_WRITE,
    SHT_NOBITS,
    SHT_PROGBITS,
    STB_GLOBAL,
    STB_LOCAL,
    STT_FILE,
    STT_NOTYPE,
    STT_SECTION,
    Elf,
    Reloc,
    Section,
    Symbol,
)
from xsbuild.errors import UnsupportedChangeError
from xsbuild.relocs import Target, bug_frame_real_offset, target_of


@dataclass(frozen=True, slots=True)
class SpecialSection:
    """An array of fixed-size entries, each belonging to the function its first field names.

    ``fragments`` names the field (offset in the entry) that points into an auxiliary section of
    variable-length pieces (replacement code, fixup code) which travel with the entry.
    """

    name: str
    entry_size: int
    # Decode (addend, field offset in the entry) into the target offset, for entries whose
    # fields are not plain relocations (bug frames).
    real_offset: Callable[[int, int], int] | None = None
    fragment_field: int | None = None
    fragment_section: str = ""


SPECIAL_SECTIONS = (
    SpecialSection(xen_abi.SEC_ALTINSTRUCTIONS,
                   xen_abi.special_entry_size(xen_abi.SEC_ALTINSTRUCTIONS),
                   fragment_field=xen_abi.ALT_INSTR.offset("repl_offset"),
                   fragment_section=xen_abi.SEC_ALTINSTR_REPLACEMENT),
    SpecialSection(xen_abi.SEC_EX_TABLE, xen_abi.special_entry_size(xen_abi.SEC_EX_TABLE),
                   fragment_field=xen_abi.EX_TABLE_ENTRY.offset("cont"),
                   fragment_section=xen_abi.SEC_FIXUP),
    *(SpecialSection(name, xen_abi.special_entry_size(name), real_offset=bug_frame_real_offset)
      for name in xen_abi.BUG_FRAME_SECTIONS),
    # 4.21+: each entry names an indirect call Xen turns into a direct one (with IBT, the
    # target's ENDBR may be gone after boot, so an unconverted call in a payload would fault).
    SpecialSection(xen_abi.SEC_ALT_CALL_SITES,
                   xen_abi.special_entry_size(xen_abi.SEC_ALT_CALL_SITES)),
)


@dataclass(slots=True)
class _Pool:
    """An output section built from individually copied pieces (strings, constants, code)."""

    sec: Section
    offsets: dict[object, int] = field(default_factory=dict)

    def add(self, key: object, body: bytes, align: int = 1) -> int:
        if key in self.offsets:
            return self.offsets[key]
        data = bytearray(self.sec.data)
        data += b"\0" * (-len(data) % max(align, 1))
        self.offsets[key] = len(data)
        data += body
        self.sec.data, self.sec.size = bytes(data), len(data)
        self.sec.addralign = max(self.sec.addralign, align)
        return self.offsets[key]


class Cloner:
    """Builds the diff object; each cloned unit's output symbol is recorded on it (``clone``)."""

    def __init__(self, ctx: DiffContext, out_name: str) -> None:
        self.ctx = ctx
        self.out = Elf(path=out_name)
        self.file = next((s.name for s in ctx.patched.symbols if s.is_file), "")
        self.out.symbols.append(Symbol(name=self.file, type=STT_FILE, shndx=0xFFF1))
        self.externals: dict[str, Symbol] = {}
        self.pools: dict[str, _Pool] = {}
        self.problems: list[str] = []

    # -- sections and symbols ----------------------------------------------------------------
    def add_section(self, name: str, flags: int, align: int, data: bytes = b"", size: int = 0,
                    sh_type: int = SHT_PROGBITS, entsize: int = 0) -> Section:
        sec = Section(name=name, type=sh_type, flags=flags, addralign=max(align, 1),
                      entsize=entsize, data=data, size=size if sh_type == SHT_NOBITS
                      else len(data))
        sec.sym = Symbol(name="", type=STT_SECTION, sec=sec)
        self.out.sections.append(sec)
        self.out.symbols.append(sec.sym)
        return sec

    def pool(self, name: str, flags: int, align: int = 1, entsize: int = 0) -> _Pool:
        if name not in self.pools:
            self.pools[name] = _Pool(self.add_section(name, flags, align, entsize=entsize))
        return self.pools[name]

    def external(self, name: str) -> Symbol:
        if name not in self.externals:
            sym = Symbol(name=name, bind=STB_GLOBAL, type=STT_NOTYPE)
            self.externals[name] = sym
            self.out.symbols.append(sym)
        return self.externals[name]

    # -- units -------------------------------------------------------------------------------
    def copy_unit(self, u: Unit) -> None:
        src = u.sec
        flags = src.flags & (SHF_ALLOC | SHF_WRITE | SHF_EXECINSTR)
        name = _section_name(src.name, u.name)
        body = u.body()
        sec = self.add_section(name, flags, src.addralign,
                               data=b"" if src.is_nobits else body, size=u.sym.size,
                               sh_type=src.type if src.is_nobits else SHT_PROGBITS)
        sym = Symbol(name=_payload_name(u), type=u.sym.type, bind=u.sym.bind,
                     other=u.sym.other, sec=sec, value=0, size=u.sym.size)
        self.out.symbols.append(sym)
        u.clone = sym

    def copy_unit_relocs(self, u: Unit) -> None:
        assert u.clone is not None
        sec = u.clone.sec
        assert sec is not None
        for r, t in self.ctx.targets(u):
            ref = self.reference(t, f"{u.sec.name}: {u.name}+{r.offset - u.sym.value:#x}")
            if ref is not None:
                sym, addend = ref
                sec.relocs.append(Reloc(r.offset - u.sym.value, r.type, sym, addend))

    def reference(self, t: Target, where: str) -> tuple[Symbol, int] | None:
        """The output symbol and addend standing for target ``t``."""
        if t.kind == "sym":
            assert t.sym is not None
            u = self.ctx.unit_of.get(t.sym)
            if u is not None and u.clone is not None:
                return u.clone, t.delta
            if u is not None:
                return self.external(u.xen_name), t.delta
            if t.sym.sec is None:
                return self.external(t.sym.name), t.delta
            self.problems.append(f"{self.ctx.object}: {where}: refers to {t.sym.name}, "
                                 f"which is neither a function nor an object xsbuild can carry")
            return None
        if t.kind == "string":
            assert t.section is not None
            p = self.pool(_pool_name(t.section.name), SHF_ALLOC | SHF_MERGE | SHF_STRINGS,
                          1, entsize=1)
            off = p.add(("str", t.content), t.content)
            return p.sec.sym, off + t.delta  # type: ignore[return-value]
        if t.kind == "const":
            assert t.section is not None
            size = len(t.content)
            p = self.pool(f".rodata.cst{size}", SHF_ALLOC | SHF_MERGE, size, entsize=size)
            off = p.add(("cst", t.content), t.content, size)
            return p.sec.sym, off + t.delta  # type: ignore[return-value]
        self.problems.append(f"{self.ctx.object}: {where}: refers to an unnamed place in "
                             f"{t.section.name if t.section else '?'}{t.delta:+#x}, which "
                             "xsbuild cannot carry into a payload")
        return None

    # -- special sections --------------------------------------------------------------------
    def copy_special(self, spec: SpecialSection) -> None:
        src = self.ctx.patched.section(spec.name)
        if src is None or not src.size:
            return
        if src.size % spec.entry_size:
            self.problems.append(f"{self.ctx.object}: {spec.name}: size {src.size} is not a "
                                 f"multiple of the {spec.entry_size}-byte entry of this "
                                 "hypervisor build")
            return
        relocs_at: dict[int, list[Reloc]] = {}
        for r in src.relocs:
            relocs_at.setdefault(r.offset // spec.entry_size * spec.entry_size, []).append(r)
        frag_bounds = self._fragment_bounds(spec, src)
        out: Section | None = None
        for off in range(0, src.size, spec.entry_size):
            relocs = relocs_at.get(off, [])
            owner = self._entry_owner(spec, relocs, off)
            if owner is None or owner.clone is None:
                continue
            if out is None:
                out = self.add_section(spec.name, src.flags, src.addralign)
                out.entsize = src.entsize
            base = len(out.data)
            out.data = out.data + src.data[off:off + spec.entry_size]
            out.size = len(out.data)
            for r in relocs:
                ref = self._special_reference(spec, src, r, frag_bounds)
                if ref is not None:
                    out.relocs.append(Reloc(base + r.offset - off, r.type, *ref))

    def _entry_owner(self, spec: SpecialSection, relocs: list[Reloc], off: int) -> Unit | None:
        first = next((r for r in relocs if r.offset == off), None)
        if first is None:
            return None
        real = spec.real_offset(first.addend, 0) if spec.real_offset else None
        t = target_of(first, real_offset=real)
        if t.kind != "sym" or t.sym is None:
            return None
        return self.ctx.unit_of.get(t.sym)

    def _fragment_bounds(self, spec: SpecialSection, src: Section) -> list[int]:
        if spec.fragment_field is None:
            return []
        aux = self.ctx.patched.section(spec.fragment_section)
        if aux is None:
            return []
        starts = {target_of(r).delta for r in src.relocs if r.sym.sec is aux
                  and r.offset % spec.entry_size == spec.fragment_field}
        return [*sorted(starts), aux.size]

    def _special_reference(self, spec: SpecialSection, src: Section, r: Reloc,
                           bounds: list[int]) -> tuple[Symbol, int] | None:
        entry_start = r.offset // spec.entry_size * spec.entry_size
        real = spec.real_offset(r.addend, r.offset - entry_start) if spec.real_offset else None
        t = target_of(r, real_offset=real)
        where = f"{src.name}+{r.offset:#x}"
        if t.kind == "anon" and t.section is not None and \
                t.section.name == spec.fragment_section:
            return self._copy_fragment(spec, t, bounds, src, r)
        return self.reference(t, where)

    def _copy_fragment(self, spec: SpecialSection, t: Target, bounds: list[int], src: Section,
                       r: Reloc) -> tuple[Symbol, int] | None:
        aux = t.section
        assert aux is not None
        start = t.delta
        if spec.name == xen_abi.SEC_ALTINSTRUCTIONS:
            entry = r.offset - spec.fragment_field  # type: ignore[operator]
            end = start + xen_abi.ALT_INSTR.unpack(src.data, entry).repl_len
        else:
            end = next((b for b in bounds if b > start), aux.size)
        flags = aux.flags & (SHF_ALLOC | SHF_EXECINSTR | SHF_WRITE)
        p = self.pool(aux.name, flags, aux.addralign)
        key = ("frag", start, end)
        fresh = key not in p.offsets
        new_off = p.add(key, bytes(aux.data[start:end]))
        if fresh:
            for fr in aux.relocs:
                if start <= fr.offset < end:
                    ref = self.reference(target_of(fr), f"{aux.name}+{fr.offset:#x}")
                    if ref is not None:
                        p.sec.relocs.append(Reloc(new_off + fr.offset - start, fr.type, *ref))
        return p.sec.sym, new_off  # type: ignore[return-value]

    # -- hooks and the funcs table -----------------------------------------------------------
    def copy_hooks(self) -> None:
        for src in self.ctx.hook_sections:
            sec = self.add_section(src.name, SHF_ALLOC, 8, data=bytes(src.data))
            for r in src.relocs:
                ref = self.reference(target_of(r), f"{src.name}+{r.offset:#x}")
                if ref is not None:
                    sec.relocs.append(Reloc(r.offset, r.type, *ref))

    def add_funcs(self) -> None:
        changed = [u for u in self.ctx.changed_functions if u.status == Status.CHANGED]
        if not changed:
            return
        strings = self.pool(xen_abi.SEC_STRINGS, SHF_ALLOC, 1)
        funcs = self.add_section(xen_abi.SEC_FUNCS, SHF_ALLOC | SHF_WRITE, xen_abi.FUNC_ALIGN,
                                 entsize=xen_abi.FUNC_SIZE)
        data = bytearray()
        for u in changed:
            off = len(data)
            name = u.xen_name
            data += xen_abi.FUNC_STRUCT.pack(0, 0, 0, u.sym.size, 0,
                                             xen_abi.LIVEPATCH_PAYLOAD_VERSION, b"", b"")
            name_off = strings.add(("name", name), name.encode() + b"\0")
            funcs.relocs.append(Reloc(off + xen_abi.FUNC_OFF_NAME, xen_abi.R_X86_64_64,
                                      strings.sec.sym, name_off))  # type: ignore[arg-type]
            funcs.relocs.append(Reloc(off + xen_abi.FUNC_OFF_NEW_ADDR, xen_abi.R_X86_64_64,
                                      u.clone, 0))  # type: ignore[arg-type]
        funcs.data, funcs.size = bytes(data), len(data)

    def run(self) -> Elf:
        for u in self.ctx.included:
            self.copy_unit(u)
        for u in self.ctx.included:
            self.copy_unit_relocs(u)
        for spec in SPECIAL_SECTIONS:
            self.copy_special(spec)
        self.copy_hooks()
        self.add_funcs()
        if self.problems:
            raise UnsupportedChangeError(self.problems)
        # Locals first is the writer's job; keep the file symbol ahead of everything.
        return self.out


def clone(ctx: DiffContext, out_name: str) -> Elf:
    """The diff object for ``ctx`` (also left in ``ctx.out``); raises
    :class:`UnsupportedChangeError` when something chosen cannot be carried (an anonymous
    reference, a malformed special section)."""
    ctx.out = Cloner(ctx, out_name).run()
    return ctx.out


def _section_name(src: str, name: str) -> str:
    """``.text.foo`` stays ``.text.foo``; a unit cut out of a shared section (``.data.read_mostly``,
    ``.text`` of an assembly file) gets ``<section>.<name>``."""
    if src.endswith("." + name):
        return src
    return f"{src}.{name}"


def _pool_name(src: str) -> str:
    # ``.rodata.xen_extra_version.str1.1`` -> ``.rodata.str1.1``: one pool per alignment.
    tail = src[src.rfind(".str"):] if ".str" in src else ".str1.1"
    return ".rodata" + tail


def _payload_name(u: Unit) -> str:
    """Statics as ``path#name`` (as Xen names them), globals plain.  The changed function keeps
    its hypervisor name: Xen treats a symbol at a ``new_addr`` as overriding, not as new."""
    if u.status == Status.CHANGED and u.twin is not None:
        return u.xen_name
    return xen_name(u.sym) if u.sym.bind == STB_LOCAL else u.sym.name
