"""Every constant of the Xen livepatch ABI that xsbuild depends on, in one place.

Each group names the section of ``shared/docs/xen-livepatch-spec.md`` ("spec §N") it comes from;
the spec in turn names the Xen source file and tag.  Nothing else in xsbuild spells out a Xen
section name, struct offset, op number or errno value.  What differs between Xen releases
(which loader checks run, in which order, which op flags exist) is one table in
:mod:`xsbuild.xen_versions`, which this module owns.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from dataclasses import dataclass
from typing import Any


class Layout:
    """A packed little-endian C structure declared once, as pyelftools declares its structs:
    field names and ``struct`` codes in order; offsets, size and the codec are derived."""

    def __init__(self, name: str, *fields: tuple[str, str]) -> None:
        self.name = name
        self.fields = fields
        self.struct = struct.Struct("<" + "".join(code for _f, code in fields))
        self.size = self.struct.size
        self._offsets: dict[str, int] = {}
        at = 0
        for field_name, code in fields:
            self._offsets[field_name] = at
            at += struct.calcsize("<" + code)
        self.record = namedtuple(name, [f for f, _c in fields])  # type: ignore[misc]

    def offset(self, field_name: str) -> int:
        return self._offsets[field_name]

    def unpack(self, data: bytes | bytearray | memoryview, at: int = 0) -> Any:
        """The entry at ``at`` as a named tuple (``entry.repl_len``)."""
        return self.record._make(self.struct.unpack_from(data, at))

    def pack(self, **values: object) -> bytes:
        return self.struct.pack(*(values[f] for f, _c in self.fields))

    def __repr__(self) -> str:
        return f"<Layout {self.name} size={self.size}>"


# --------------------------------------------------------------------------------------------
# ELF header requirements (spec §1.1)
ELF_MACHINE_X86_64 = 62  # EM_X86_64
ELF_OSABI_ACCEPTED = frozenset({0, 9})  # SYSV/NONE and FreeBSD; GNU (3) is rejected
MAX_SECTIONS = 1024  # e_shnum must be below this
# The ELF64 structures the loader reads (gABI), declared once: the reader (elfraw), the writer
# (elf) and the offline loader check (check) all decode and encode through these.
ELF64_EHDR = Layout("Elf64_Ehdr", ("e_ident", "16s"), ("e_type", "H"), ("e_machine", "H"),
                    ("e_version", "I"), ("e_entry", "Q"), ("e_phoff", "Q"), ("e_shoff", "Q"),
                    ("e_flags", "I"), ("e_ehsize", "H"), ("e_phentsize", "H"), ("e_phnum", "H"),
                    ("e_shentsize", "H"), ("e_shnum", "H"), ("e_shstrndx", "H"))
ELF64_SHDR = Layout("Elf64_Shdr", ("sh_name", "I"), ("sh_type", "I"), ("sh_flags", "Q"),
                    ("sh_addr", "Q"), ("sh_offset", "Q"), ("sh_size", "Q"), ("sh_link", "I"),
                    ("sh_info", "I"), ("sh_addralign", "Q"), ("sh_entsize", "Q"))
ELF64_SYM = Layout("Elf64_Sym", ("st_name", "I"), ("st_info", "B"), ("st_other", "B"),
                   ("st_shndx", "H"), ("st_value", "Q"), ("st_size", "Q"))
ELF64_RELA = Layout("Elf64_Rela", ("r_offset", "Q"), ("r_info", "Q"), ("r_addend", "q"))
ELF64_EHDR_SIZE = ELF64_EHDR.size
ELF64_SHDR_SIZE = ELF64_SHDR.size
ELF64_SYM_SIZE = ELF64_SYM.size
ELF64_RELA_SIZE = ELF64_RELA.size
ELF64_REL_SIZE = 16  # Elf64_Rel: xsbuild reads and writes RELA only
assert (ELF64_EHDR_SIZE, ELF64_SHDR_SIZE, ELF64_SYM_SIZE, ELF64_RELA_SIZE) == (64, 64, 24, 24)

# Size limits (spec §1.9, §1.2)
LIVEPATCH_MAX_SIZE = 2 * 1024 * 1024  # payload file, and each NOBITS alloc section
PAGE_SIZE = 4096
NAME_SIZE = 128  # XEN_LIVEPATCH_NAME_SIZE, including the NUL: 127 usable characters
KSYM_NAME_LEN = 127  # runtime symbol names are truncated to 126 characters

# --------------------------------------------------------------------------------------------
# Section names the loader recognises (spec §1.4)
SEC_FUNCS = ".livepatch.funcs"
SEC_DEPENDS = ".livepatch.depends"
SEC_XEN_DEPENDS = ".livepatch.xen_depends"
SEC_BUILD_ID = ".note.gnu.build-id"
SEC_MODINFO = ".modinfo"
SEC_ALTINSTRUCTIONS = ".altinstructions"
SEC_ALTINSTR_REPLACEMENT = ".altinstr_replacement"
SEC_EX_TABLE = ".ex_table"
SEC_FIXUP = ".fixup"
SEC_ALT_CALL_SITES = ".alt_call_sites"  # 4.21+ (spec §8): struct alt_call {s32 offset;}
BUG_FRAME_SECTIONS = (".bug_frames.0", ".bug_frames.1", ".bug_frames.2", ".bug_frames.3")
REQUIRED_NOTE_SECTIONS = (SEC_DEPENDS, SEC_XEN_DEPENDS, SEC_BUILD_ID)

# Hook sections: load/unload are arrays of void (*)(void); the others hold exactly one pointer.
HOOK_PREFIX = ".livepatch.hooks."
HOOK_ARRAY_KINDS = ("load", "unload")
HOOK_SINGLE_KINDS = ("preapply", "apply", "postapply", "prerevert", "revert", "postrevert")
HOOK_KINDS = HOOK_ARRAY_KINDS + HOOK_SINGLE_KINDS
HOOK_SECTIONS = tuple(HOOK_PREFIX + k for k in HOOK_KINDS)
# Pre/post hooks "veto" REPLACE (-EOPNOTSUPP); apply/revert action hooks do not (spec §4.2).
VETOING_HOOK_KINDS = ("preapply", "postapply", "prerevert", "postrevert")
HOOK_POINTER_SIZE = 8
# At least one of these must be present and non-empty: "Nothing to patch" otherwise.
PATCHING_SECTIONS = (SEC_FUNCS, *HOOK_SECTIONS)

# Author annotations read by the differ (a livepatch-build-tools convention, spec §1.4 "not
# recognised" by Xen: they never reach a payload).
SEC_IGNORE_FUNCTIONS = ".livepatch.ignore.functions"
SEC_IGNORE_SECTIONS = ".livepatch.ignore.sections"
# xsbuild's own convention, not Xen's: the names .livepatch.funcs entries point at (a plain
# read-only section, which the loader accepts like any other).
SEC_STRINGS = ".livepatch.strings"

# --------------------------------------------------------------------------------------------
# Special sections: arrays of fixed-size entries whose entries belong to functions
# (spec §1.4; sizes measured on Debian's build, target-notes "Debian's xen-syms has no DWARF").
# struct alt_instr (packed): offsets of the original and replacement code relative to their own
# fields, the CPU feature, and the three lengths.
ALT_INSTR = Layout("alt_instr", ("orig_offset", "i"), ("repl_offset", "i"), ("cpuid", "H"),
                   ("orig_len", "B"), ("repl_len", "B"), ("pad_len", "B"), ("priv", "B"))
ALT_INSTR_SIZE = ALT_INSTR.size
assert ALT_INSTR_SIZE == 14
# struct exception_table_entry: where a fault may happen, where execution continues (both
# relative to their own fields).
EX_TABLE_ENTRY = Layout("exception_table_entry", ("addr", "i"), ("cont", "i"))
EX_TABLE_ENTRY_SIZE = EX_TABLE_ENTRY.size
# struct bug_frame: two 32-bit fields, each a displacement from the *frame's start* in its low
# BUG_DISP_WIDTH bits and part of the source line in its upper bits (x86 asm/bug.h); the location
# of the ud2, then the file name (or run_fn's function).
BUG_FRAME = Layout("bug_frame", ("loc_disp", "i"), ("ptr_disp", "i"))
BUG_FRAME_SIZE = BUG_FRAME.size
# Assert frames carry a second frame whose second field is the message's displacement (also from
# the start of the first frame).
ASSERT_FRAME = Layout("assert_bug_frame", ("loc_disp", "i"), ("ptr_disp", "i"),
                      ("unused", "i"), ("msg_disp", "i"))
# A bug frame's two 32-bit displacement fields keep the source line in their upper bits; the
# displacement proper is the low 24 (x86 asm/bug.h BUG_DISP_WIDTH; measured on Debian's objects:
# ".rela.bug_frames.2" addends such as ".text.fixup_exception_return + 0x7000148").
BUG_DISP_WIDTH = 24
BUG_FRAME_ASSERT = BUG_FRAME_SECTIONS[3]  # assert frames carry a second frame: the message
# Field offsets inside one entry; every field is a 32-bit displacement from the field itself
# (alt_instr, exception_table_entry) or from the frame's start (bug_frame, low BUG_DISP_WIDTH
# bits; the assert message's field is msg_disp[1]).  Spec §1.4; x86 asm/alternative.h,
# asm/uaccess.h, asm/bug.h @4.17.5.
ALT_OFF_ORIG = 0
ALT_OFF_REPL = 4
EX_TABLE_OFF_ADDR = 0
EX_TABLE_OFF_CONT = 4
BUG_FRAME_OFF_LOC = 0
BUG_FRAME_OFF_PTR = 4
BUG_FRAME_OFF_MSG = 12
# How xen-syms' linker script brackets those arrays (it merges them into .rodata/.data, so they
# have no sections of their own there): (start, stop) symbols, measured on Debian's xen-syms.
XEN_ALT_RANGE = ("__alt_instructions", "__alt_instructions_end")
XEN_EX_TABLE_RANGE = ("__start___ex_table", "__stop___ex_table")
XEN_ALT_CALL_RANGE = ("__alt_call_sites_start", "__alt_call_sites_end")  # 4.21+ xen.lds.S
XEN_BUG_FRAME_RANGES = (("__start_bug_frames", "__stop_bug_frames_0"),
                        ("__stop_bug_frames_0", "__stop_bug_frames_1"),
                        ("__stop_bug_frames_1", "__stop_bug_frames_2"),
                        ("__stop_bug_frames_2", "__stop_bug_frames_3"))


# struct alt_call (4.21+, x86 asm/alternative-call.h; spec §8): the offset, relative to the field,
# of a 6-byte indirect call (``call *fn(%rip)``) that boot code turns into a direct call.
ALT_CALL = Layout("alt_call", ("offset", "i"))
ALT_CALL_SITE_LEN = 6


def special_entry_size(section: str) -> int:
    """Bytes per entry of an arch special section (0 for any other section)."""
    if section == SEC_ALTINSTRUCTIONS:
        return ALT_INSTR_SIZE
    if section == SEC_EX_TABLE:
        return EX_TABLE_ENTRY_SIZE
    if section == SEC_ALT_CALL_SITES:
        return ALT_CALL.size
    if section == BUG_FRAME_ASSERT:
        return ASSERT_FRAME.size
    if section in BUG_FRAME_SECTIONS:
        return BUG_FRAME_SIZE
    return 0

# --------------------------------------------------------------------------------------------
# struct livepatch_func (spec §1.5): 104 bytes, version 2
LIVEPATCH_PAYLOAD_VERSION = 2
FUNC_ALIGN = 8
EXPECT_SIZE = 32
OPAQUE_SIZE = 31  # LIVEPATCH_OPAQUE_SIZE; also the NOP patch limit
LIVEPATCH_FUNC = Layout("livepatch_func", ("name", "Q"), ("new_addr", "Q"), ("old_addr", "Q"),
                        ("new_size", "I"), ("old_size", "I"), ("version", "B"), ("pad", "39s"),
                        ("expect", f"{EXPECT_SIZE}s"))
FUNC_STRUCT = LIVEPATCH_FUNC.struct
FUNC_SIZE = LIVEPATCH_FUNC.size
assert FUNC_SIZE == 104
FUNC_OFF_NAME = LIVEPATCH_FUNC.offset("name")
FUNC_OFF_NEW_ADDR = LIVEPATCH_FUNC.offset("new_addr")
FUNC_OFF_OLD_ADDR = LIVEPATCH_FUNC.offset("old_addr")
FUNC_OFF_NEW_SIZE = LIVEPATCH_FUNC.offset("new_size")
FUNC_OFF_OLD_SIZE = LIVEPATCH_FUNC.offset("old_size")
FUNC_OFF_VERSION = LIVEPATCH_FUNC.offset("version")
FUNC_OFF_EXPECT = LIVEPATCH_FUNC.offset("expect")

# x86 patching (spec §3.1)
PATCH_INSN_SIZE = 5  # E9 rel32
ENDBR64 = bytes.fromhex("f30f1efa")
ENDBR64_POISON = bytes.fromhex("660f1f01")  # nopw (%rcx), written over unused ENDBR64 at boot
ENDBR64_LEN = 4
LIVEPATCH_RANGE = 2**31  # old_addr - new_addr must lie in [-2 GiB, 2 GiB)

# --------------------------------------------------------------------------------------------
# Build-id notes (spec §1.6)
NT_GNU_BUILD_ID = 3
NOTE_NAME_GNU = b"GNU\0"
NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type

# --------------------------------------------------------------------------------------------
# Relocation kinds (x86-64 psABI; spec §1.8): one row per type, as cle keeps one class per type.
# ``width`` is the field the type writes; ``pc_relative`` says the CPU adds the distance from the
# field to the end of its instruction (the addend then names ``target - (insn_end - r_offset)``);
# ``accepted``: Xen's loader performs it (every other type is -EOPNOTSUPP).


@dataclass(frozen=True, slots=True)
class RelocKind:
    type: int
    name: str
    width: int
    pc_relative: bool
    accepted: bool = False


RELOC_KINDS = {k.type: k for k in (
    RelocKind(0, "R_X86_64_NONE", 0, False, accepted=True),
    RelocKind(1, "R_X86_64_64", 8, False, accepted=True),
    RelocKind(2, "R_X86_64_PC32", 4, True, accepted=True),
    RelocKind(3, "R_X86_64_GOT32", 4, False),
    RelocKind(4, "R_X86_64_PLT32", 4, True, accepted=True),
    RelocKind(9, "R_X86_64_GOTPCREL", 4, True),
    RelocKind(10, "R_X86_64_32", 4, False),
    RelocKind(11, "R_X86_64_32S", 4, False),
    RelocKind(24, "R_X86_64_PC64", 8, True),
    RelocKind(41, "R_X86_64_GOTPCRELX", 4, True),
    RelocKind(42, "R_X86_64_REX_GOTPCRELX", 4, True),
)}
R_X86_64_NONE = 0
R_X86_64_64 = 1
R_X86_64_PC32 = 2
R_X86_64_PLT32 = 4
ACCEPTED_RELOC_TYPES = frozenset(k.type for k in RELOC_KINDS.values() if k.accepted)
PC_RELATIVE_RELOC_TYPES = frozenset(k.type for k in RELOC_KINDS.values() if k.pc_relative)
RELOC_TYPE_NAMES = {k.type: k.name for k in RELOC_KINDS.values()}
DEFAULT_RELOC_WIDTH = 4  # an unknown type is assumed to write a 32-bit field


def reloc_type_name(rtype: int) -> str:
    return RELOC_TYPE_NAMES.get(rtype, f"R_X86_64_<{rtype}>")


def is_pc_relative(rtype: int) -> bool:
    return rtype in PC_RELATIVE_RELOC_TYPES


def reloc_width(rtype: int) -> int:
    kind = RELOC_KINDS.get(rtype)
    return kind.width if kind else DEFAULT_RELOC_WIDTH


# --------------------------------------------------------------------------------------------
# Errno values as Xen returns them (spec §4.1; xen/include/public/errno.h)
EPERM = 1
ENOENT = 2
E2BIG = 7
EAGAIN = 11
ENOMEM = 12
EACCES = 13
EFAULT = 14
EBUSY = 16
EEXIST = 17
EINVAL = 22
ENOSPC = 28
ERANGE = 34
ENOSYS = 38
ENODATA = 61
EOVERFLOW = 75
EOPNOTSUPP = 95
ENOBUFS = 105
ERRNO_NAMES = {
    EPERM: "EPERM", ENOENT: "ENOENT", E2BIG: "E2BIG", EAGAIN: "EAGAIN", ENOMEM: "ENOMEM",
    EACCES: "EACCES", EFAULT: "EFAULT", EBUSY: "EBUSY", EEXIST: "EEXIST", EINVAL: "EINVAL",
    ENOSPC: "ENOSPC", ERANGE: "ERANGE", ENOSYS: "ENOSYS", ENODATA: "ENODATA",
    EOVERFLOW: "EOVERFLOW", EOPNOTSUPP: "EOPNOTSUPP", ENOBUFS: "ENOBUFS",
}


def errno_name(value: int) -> str:
    return ERRNO_NAMES.get(abs(value), f"errno {abs(value)}")


# --------------------------------------------------------------------------------------------
# The sysctl livepatch op (spec §4)
HYPERVISOR_SYSCTL = 35
HYPERVISOR_XEN_VERSION = 17
XENVER_VERSION = 0  # returns (major << 16) | minor (xen/include/public/version.h)
XENVER_EXTRAVERSION = 1  # fills a char[16] with the extra version (".5")
XENVER_BUILD_ID = 10
XEN_SYSCTL_LIVEPATCH_OP = 27
SYSCTL_INTERFACE_VERSION_4_17 = 0x15  # 4.17.x .. 4.20.x
SYSCTL_INTERFACE_VERSION_4_21 = 0x16  # 4.21 and later: LIST sizes are IN/OUT
SYSCTL_INTERFACE_VERSIONS = (SYSCTL_INTERFACE_VERSION_4_17, SYSCTL_INTERFACE_VERSION_4_21)
XEN_SYSCTL_SIZE = 136  # cmd u32, interface_version u32, union u[128]
LIVEPATCH_OP_SIZE = 72  # at offset 8 of xen_sysctl
IOCTL_PRIVCMD_HYPERCALL = 0x00305000

# xen_sysctl_livepatch_op.cmd
LIVEPATCH_CMD_UPLOAD = 0
LIVEPATCH_CMD_GET = 1
LIVEPATCH_CMD_LIST = 2
LIVEPATCH_CMD_ACTION = 3

# xen_sysctl_livepatch_action.cmd
LIVEPATCH_ACTION_UNLOAD = 1
LIVEPATCH_ACTION_REVERT = 2
LIVEPATCH_ACTION_APPLY = 3
LIVEPATCH_ACTION_REPLACE = 4
LIVEPATCH_ACTION_APPLY_NODEPS = 1  # action flags
LIVEPATCH_FLAG_FORCE = 1  # op flags, 4.19+: the op's ``pad`` field became ``flags``
LIVEPATCH_FLAGS_MASK = LIVEPATCH_FLAG_FORCE  # other bits only with FORCE (master livepatch_op)

# xen_livepatch_status.state
LIVEPATCH_STATE_CHECKED = 1
LIVEPATCH_STATE_APPLIED = 2
STATE_NAMES = {LIVEPATCH_STATE_CHECKED: "CHECKED", LIVEPATCH_STATE_APPLIED: "APPLIED"}

LIST_MAX_NR = 1024  # nr above this: -E2BIG
DEFAULT_ACTION_TIMEOUT_NS = 30_000_000  # 0 means 30 ms in the hypervisor too


@dataclass(frozen=True, slots=True)
class StructField:
    """One field of a sysctl struct: offset and size in bytes (spec §4.2 tables)."""

    offset: int
    size: int


# Layouts of spec §4.2, offsets relative to the start of each struct.
SYSCTL_LAYOUT = {"cmd": StructField(0, 4), "interface_version": StructField(4, 4),
                 "u": StructField(8, 128)}
LIVEPATCH_OP_LAYOUT = {"cmd": StructField(0, 4), "pad": StructField(4, 4), "u": StructField(8, 64)}
NAME_LAYOUT = {"name": StructField(0, 8), "size": StructField(8, 2), "pad": StructField(10, 6)}
UPLOAD_LAYOUT = {"name": StructField(0, 16), "size": StructField(16, 8),
                 "payload": StructField(24, 8)}
GET_LAYOUT = {"name": StructField(0, 16), "status": StructField(16, 8)}
STATUS_LAYOUT = {"state": StructField(0, 4), "rc": StructField(4, 4)}
LIST_LAYOUT = {
    "version": StructField(0, 4), "idx": StructField(4, 4), "nr": StructField(8, 4),
    "pad": StructField(12, 4), "name_total_size": StructField(16, 4),
    "metadata_total_size": StructField(20, 4), "status": StructField(24, 8),
    "name": StructField(32, 8), "len": StructField(40, 8), "metadata": StructField(48, 8),
    "metadata_len": StructField(56, 8),
}
ACTION_LAYOUT = {"name": StructField(0, 16), "cmd": StructField(16, 4),
                 "timeout": StructField(20, 4), "flags": StructField(24, 4),
                 "pad": StructField(28, 4)}
STRUCT_SIZES = {"xen_sysctl": 136, "xen_sysctl_livepatch_op": 72, "xen_livepatch_name": 16,
                "xen_sysctl_livepatch_upload": 32, "xen_sysctl_livepatch_get": 24,
                "xen_livepatch_status": 8, "xen_sysctl_livepatch_list": 64,
                "xen_sysctl_livepatch_action": 32}

# --------------------------------------------------------------------------------------------
# Apply tool / hypercall transport (issue 4; spec §4.1, §4.2, §5)
# struct xen_build_id {u32 len; u8 buf[];}: XENVER_build_id's argument
# (xen/include/public/version.h)
XEN_BUILD_ID_HEADER_SIZE = 4
HYPERCALL_PRIVCMD_ARGS = 5  # struct privcmd_hypercall {u64 op; u64 arg[5];}: 48 bytes
LIST_VERSION_RESTARTS = 4  # libxc restarts a LIST walk this often on a version change, then EBUSY
XEN_LIVEPATCH_ACTION_TIMEOUT_MAX_NS = 2**32 - 1  # action.timeout is a u32 of ns (about 4.29 s)
# xen-livepatch prints rc != 0 after the state like this in `list` (spec §5)
XEN_LIVEPATCH_LIST_NAME_WIDTH = 40

# --------------------------------------------------------------------------------------------
# Real-Xen e2e tests (tests/xen): XENVER_extraversion, which /sys/hypervisor/version/extra reads,
# copies xen_extra_version() into a char[16] (xen_extraversion_t, xen/include/public/version.h
# @4.17.5; not in the spec): a replacement string must be at most 15 characters to read back whole.
XEN_EXTRAVERSION_LEN = 16

# --------------------------------------------------------------------------------------------
# Test fixtures (tests/support/image.py): where xen-syms is linked, so a fixture image can be
# laid out at the hypervisor's own addresses.  Measured on Debian's xen-syms (first PT_LOAD and
# .text at XEN_VIRT_START + 2 MiB; spec §0 names the file, the address is not in the spec).
XEN_TEXT_START_X86_64 = 0xFFFF82D040200000
