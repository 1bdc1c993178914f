"""Which Xen release does what: the per-version loader and sysctl rules, in one table.

Part of the ABI that :mod:`xsbuild.xen_abi` owns: every rule whose answer depends on the target
hypervisor's release is one :class:`VersionRule` row of :data:`RULES`, with the releases it holds
for (stable backports included) and the spec section it comes from.  Nothing else in xsbuild
compares version numbers: ``check`` asks ``target.has(Rule.X)``, the apply tool and the simulator
likewise.

Release boundaries are those of spec §8, checked against the release tags of xen-project/xen:
where a stable branch got a backport (the upload-path hardening of 4.20 reached 4.18.4 and
4.19.1) the row says so, since a hypervisor built from 4.19.6 behaves like 4.20 there.

A version comes from ``--xen-version``, from ``xen-syms`` (:func:`read_xen_version`: the
embedded ``.config``'s ``Xen/x86 X.Y.Z Configuration`` header, else the ``xen_major_version`` /
``xen_minor_version`` code and the ``xen_extra_version`` string) or from the running hypervisor
(``XENVER_version``/``XENVER_extraversion``).  A version whose patch level is unknown ("4.17")
answers a rule that changed within its line with the row's ``when_unknown``.
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass
from enum import StrEnum

from xsbuild.errors import UsageError
from xsbuild.xensyms import XenSymbols

OLDEST_SUPPORTED = (4, 17)  # the spec covers 4.17.0 and later
LAST_PATCH = 10**6  # stands for "every later patch release of that line"


@dataclass(frozen=True, slots=True, order=True)
class XenVersion:
    """``major.minor[.patch]``; ``patch`` None when only the line is known."""

    major: int
    minor: int
    patch: int | None = None

    @classmethod
    def parse(cls, text: str) -> XenVersion:
        """``4.17``, ``4.17.5``, ``4.17.5+72-g01140da4e8-1``, ``4.22-unstable``, ``4.21.0-rc3``.

        Raises ``UsageError`` for anything else, and for releases older than 4.17.
        """
        m = re.fullmatch(r"\s*(\d+)\.(\d+)(?:\.(\d+))?([-+~][\w.+~-]*)?\s*", text)
        if not m:
            raise UsageError(f"bad Xen version {text!r}: give X.Y or X.Y.Z, e.g. 4.17.5")
        patch = int(m[3]) if m[3] is not None else None
        if patch is None and m[4] and m[4].startswith("-"):
            patch = 0  # 4.22-unstable, 4.21-rc: the line's development tree, before .0
        version = cls(int(m[1]), int(m[2]), patch)
        if (version.major, version.minor) < OLDEST_SUPPORTED:
            raise UsageError(f"Xen {version} is older than 4.17: xsbuild knows the loader of "
                             "4.17 and later only (spec §8)")
        return version

    @property
    def line(self) -> tuple[int, int]:
        return self.major, self.minor

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + ("" if self.patch is None else f".{self.patch}")


def V(text: str) -> XenVersion:  # reads like a literal in the table
    return XenVersion.parse(text)


@dataclass(frozen=True, slots=True)
class Span:
    """Releases ``first`` .. ``last`` inclusive (``last`` None: every later release)."""

    first: XenVersion
    last: XenVersion | None = None

    def contains(self, v: XenVersion) -> bool | None:
        """True/False, or None when ``v``'s unknown patch level decides it."""
        if v.patch is not None:
            return self._has(v)
        lo, hi = XenVersion(v.major, v.minor, 0), XenVersion(v.major, v.minor, LAST_PATCH)
        if self._has(lo) and self._has(hi) and (self.last is None or self.last >= hi):
            return True  # the span covers the whole line
        if (self.last is not None and self.last < lo) or self.first > hi:
            return False
        return None

    def _has(self, v: XenVersion) -> bool:
        return self.first <= v and (self.last is None or v <= self.last)


def line_end(line: str) -> XenVersion:
    """The last release of a stable line, whatever its number (``4.18`` -> 4.18.<any>)."""
    major, minor = map(int, line.split("."))
    return XenVersion(major, minor, LAST_PATCH)


class Rule(StrEnum):
    """A behaviour of the hypervisor that differs between releases."""

    DUPLICATE_SECTION_CHECK = "duplicate-section-check"
    XEN_BUILD_ID_FIRST = "xen-build-id-first"
    ALTERNATIVES_BOUNDS = "alternatives-bounds"
    ALTERNATIVES_ERRNO = "alternatives-errno"
    FUNCS_WRITTEN_AT_APPLY = "funcs-written-at-apply"
    ALT_CALL_SITES = "alt-call-sites"
    FLAG_FORCE = "flag-force"
    LIST_SIZES_IN = "list-sizes-in"


@dataclass(frozen=True, slots=True)
class VersionRule:
    """One row: the rule, the releases it holds for, where it is written down."""

    rule: Rule
    spans: tuple[Span, ...]
    spec: str  # the spec section ("§8") the fact comes from
    summary: str  # what holds in those releases
    when_unknown: bool  # the answer for a version whose patch level is unknown ("4.17")
    # ... and when nothing is known (a payload-only check); None: the same as when_unknown
    when_unversioned: bool | None = None

    def holds(self, v: XenVersion | None) -> bool:
        if v is None:
            return self.when_unknown if self.when_unversioned is None else self.when_unversioned
        answers = {span.contains(v) for span in self.spans}
        if True in answers:
            return True
        return self.when_unknown if None in answers else False


# The upload hardening of 4.20 (fa49f4be41, aa5a06d5d6), backported to 4.18.4 and 4.19.1.
_UPLOAD_HARDENING = (Span(V("4.18.4"), line_end("4.18")), Span(V("4.19.1"), line_end("4.19")),
                     Span(V("4.20.0")))

RULES: dict[Rule, VersionRule] = {r.rule: r for r in (
    VersionRule(Rule.DUPLICATE_SECTION_CHECK, (Span(V("4.17.0"), line_end("4.19")),), "§1.4, §8",
                "check_special_sections has a 'seen more than once' test; it can never fire "
                "(lookup returns the first section of a name), and 4.20 dropped it (3a28da8f4d, "
                "'no functional change'): a duplicate note section is accepted everywhere, the "
                "first one counts", when_unknown=True),
    VersionRule(Rule.XEN_BUILD_ID_FIRST,
                _UPLOAD_HARDENING, "§1.6, §8",
                ".livepatch.xen_depends is checked right after the ELF headers, before "
                "anything is moved or relocated (fa49f4be41; backported to 4.18.4 and 4.19.1)",
                when_unknown=False),
    VersionRule(Rule.ALTERNATIVES_BOUNDS, (Span(V("4.17.4"), line_end("4.17")), Span(V("4.18.0"))),
                "§1.4, §8", ".altinstructions entries must point inside the payload's text and "
                ".altinstr_replacement (1601fa5ac1); before, the loader patched wherever they "
                "point", when_unknown=True),
    VersionRule(Rule.ALTERNATIVES_ERRNO,
                _UPLOAD_HARDENING, "§1.4, §8",
                "a replacement longer than its site fails the upload with -ENOSPC (aa5a06d5d6; "
                "backported to 4.18.4 and 4.19.1); before, apply_alternatives BUG()s",
                when_unknown=False),
    VersionRule(Rule.FUNCS_WRITTEN_AT_APPLY,
                (Span(V("4.17.1"), V("4.17.2")), Span(V("4.18.0"), V("4.18.0"))), "§1.5, §8",
                "APPLY writes opaque/applied/patch_offset inside .livepatch.funcs with CR0.WP "
                "set: a read-only .livepatch.funcs page-faults the host", when_unknown=True,
                when_unversioned=False),
    VersionRule(Rule.ALT_CALL_SITES, (Span(V("4.21.0")),), "§1.4, §8",
                "the loader understands .alt_call_sites (s32 offsets to 6-byte indirect calls "
                "inside the payload's text); older releases load it as plain data and never "
                "patch the sites", when_unknown=True),
    VersionRule(Rule.FLAG_FORCE, (Span(V("4.19.0")),), "§4.2, §8",
                "livepatch_op.pad is flags, LIVEPATCH_FLAG_FORCE = 1; before, a non-zero pad "
                "is -EINVAL", when_unknown=False),
    VersionRule(Rule.LIST_SIZES_IN, (Span(V("4.21.0")),), "§4.1, §4.2, §8",
                "sysctl interface 0x16: LIST name/metadata sizes are IN as well, -ENOBUFS when "
                "an entry does not fit; before, interface 0x15", when_unknown=False),
)}


class VersionSource(StrEnum):
    """How xsbuild learned the target's version (reported by ``check``)."""

    OPTION = "option"  # --xen-version
    CONFIG = "xen-syms .config"  # xen_config_data's "Xen/x86 X.Y.Z Configuration" header
    CODE = "xen-syms code"  # xen_major_version/xen_minor_version immediates, extra string
    HYPERVISOR = "hypervisor"  # XENVER_version / XENVER_extraversion
    SIMULATOR = "simulator"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Target:
    """The hypervisor a payload is checked for: its version (None: unknown) and configuration."""

    version: XenVersion | None = None
    source: VersionSource = VersionSource.UNKNOWN
    alternative_call: bool | None = None  # CONFIG_ALTERNATIVE_CALL; None: not known (assume y)

    def has(self, rule: Rule) -> bool:
        return RULES[rule].holds(self.version)

    @property
    def interface_version(self) -> int:
        from xsbuild import xen_abi

        return (xen_abi.SYSCTL_INTERFACE_VERSION_4_21 if self.has(Rule.LIST_SIZES_IN)
                else xen_abi.SYSCTL_INTERFACE_VERSION_4_17)

    def describe(self) -> str:
        if self.version is None:
            return "an unknown Xen version (rules common to 4.17 and later)"
        return f"Xen {self.version} (from {self.source})"


UNKNOWN_TARGET = Target()


# ------------------------------------------------------------------------------------------------
# Reading the version from xen-syms

CONFIG_DATA = "xen_config_data"  # common/config_data.S (CONFIG_HYPFS_CONFIG, default y)
CONFIG_DATA_SIZE = "xen_config_data_size"
_CONFIG_HEADER = re.compile(rb"^# Xen/\w+ (\S+) Configuration$", re.M)
_MOV_EAX_IMM32 = 0xB8  # mov $imm32, %eax: how gcc returns a constant
_LEA_RAX_RIP = bytes.fromhex("488d05")  # lea rel32(%rip), %rax: how gcc returns a string


def read_xen_version(xs: XenSymbols) -> Target | None:
    """The hypervisor's version and CONFIG_ALTERNATIVE_CALL, as ``xs`` records them; None when
    ``xs`` holds neither source (a stand-in image: give ``--xen-version``)."""
    config = _config_text(xs)
    if config is not None:
        m = _CONFIG_HEADER.search(config)
        if m:
            altcall = re.search(rb"^CONFIG_ALTERNATIVE_CALL=y$", config, re.M) is not None
            return Target(XenVersion.parse(m[1].decode()), VersionSource.CONFIG, altcall)
    version = _version_from_code(xs)
    return Target(version, VersionSource.CODE, None) if version is not None else None


def _config_text(xs: XenSymbols) -> bytes | None:
    """The ``.config`` Xen embeds gzipped for hypfs' /buildinfo/config, if it does."""
    data, size = xs.lookup(CONFIG_DATA), xs.lookup(CONFIG_DATA_SIZE)
    if data is None or size is None:
        return None
    raw_size = _data_bytes(xs, size.addr, 4)
    if len(raw_size) != 4:
        return None
    blob = _data_bytes(xs, data.addr, int.from_bytes(raw_size, "little"))
    try:
        return gzip.decompress(blob)
    except (OSError, EOFError, zlib.error):
        return None


def _data_bytes(xs: XenSymbols, addr: int, length: int) -> bytes:
    found = xs.data_at(addr)
    if found is None:
        return b""
    return bytes(found[2][:length])


def _immediate(xs: XenSymbols, name: str) -> int | None:
    """The constant function ``name`` returns (``mov $imm32, %eax`` at its start)."""
    sym = xs.lookup(name)
    if sym is None:
        return None
    code = xs.read(sym.addr, 9)
    if code[:4] in (bytes.fromhex("f30f1efa"), bytes.fromhex("660f1f01")):
        code = code[4:]  # ENDBR64 or its poison first
    if len(code) < 5 or code[0] != _MOV_EAX_IMM32:
        return None
    return int.from_bytes(code[1:5], "little")


def _extra_version(xs: XenSymbols) -> str:
    """The string ``xen_extra_version()`` returns (".5"), or "" when it cannot be followed."""
    sym = xs.lookup("xen_extra_version")
    if sym is None:
        return ""
    code = xs.read(sym.addr, 7)
    if len(code) != 7 or code[:3] != _LEA_RAX_RIP:
        return ""
    target = sym.addr + 7 + int.from_bytes(code[3:7], "little", signed=True)
    text = _data_bytes(xs, target, 64)
    return text.split(b"\0", 1)[0].decode("ascii", "replace")


def _version_from_code(xs: XenSymbols) -> XenVersion | None:
    major, minor = _immediate(xs, "xen_major_version"), _immediate(xs, "xen_minor_version")
    if major is None or minor is None:
        return None
    extra = _extra_version(xs)
    m = re.match(r"\.(\d+)", extra)
    return XenVersion.parse(f"{major}.{minor}" + (f".{m[1]}" if m else extra if
                                                  extra.startswith("-") else ""))


def target_for(option: str | None, xs: XenSymbols | None) -> Target:
    """The target of ``check``: ``--xen-version``, else what ``xen-syms`` says, else unknown.

    Both given: they must agree (``UsageError`` otherwise), and xen-syms adds its config.  A
    xen-syms that does not tell its version is no error: the rules common to all releases apply.
    """
    from_syms = read_xen_version(xs) if xs is not None else None
    if option is None:
        return from_syms or UNKNOWN_TARGET
    given = XenVersion.parse(option)
    if from_syms is None:
        return Target(given, VersionSource.OPTION, None)
    have = from_syms.version
    assert have is not None
    if have.line != given.line or (None not in (have.patch, given.patch)
                                   and have.patch != given.patch):
        raise UsageError(f"--xen-version {given} contradicts {xs.path if xs else ''}, which is "
                         f"Xen {have} (from its {from_syms.source}): drop one of them")
    best = given if have.patch is None else have
    return Target(best, from_syms.source if best == have else VersionSource.OPTION,
                  from_syms.alternative_call)
