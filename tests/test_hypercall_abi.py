"""The sysctl livepatch ABI (spec §4.1, §4.2): ctypes layout, encoding, transports.

The expected offsets and sizes are read from the spec's own text (its tables and ``@offset``
bullets), not from ``xsbuild.xen_abi``, and also from a C program compiled with gcc that declares
the structs as the spec describes.  A wrong constant in ``xen_abi`` or a ctypes alignment surprise
fails here before it can reach a hypervisor.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import subprocess
from pathlib import Path

import pytest

from xsbuild import xen_abi
from xsbuild.errors import HypercallError, HypervisorBusy, UsageError
from xsbuild.hypercall import abi
from xsbuild.hypercall.backend import SysctlBackend, encode_name, hypercall_error
from xsbuild.hypercall.privcmd import PrivcmdTransport, _locked_anonymous
from xsbuild.hypercall.sim import SimBuffer

SPEC = Path("/work/shared/docs/xen-livepatch-spec.md")

# ------------------------------------------------------------------------------------------------
# Reading the spec's layout tables

_HEADER = re.compile(r"`(?:struct )?(xen_\w+)`\**\s*(?:\(|is |of )(\d+) bytes")
_BULLET = re.compile(r"^(\s*)[*-] (?:union )?`(\w+)(\[\d+\])?`\s*(u\d+|s\d+|handle)?[^@|]*?@(\d+)")
_ROW = re.compile(r"^\| (\d+) \| (\d+) \| (?:union )?`(\w+)`")
_TYPE_SIZES = {"handle": 8, "u16": 2, "u32": 4, "s32": 4, "u64": 8}


def _spec_section4() -> list[str]:
    if not SPEC.exists():
        pytest.skip(f"{SPEC} is not on this machine")
    text = SPEC.read_text()
    start, end = text.index("## 4. The sysctl ABI"), text.index("### 4.3 libxenctrl")
    return text[start:end].splitlines()


def _bullet_fields(lines: list[str], h: int) -> dict[str, tuple[int, int | None]]:
    """``{field: (offset, size or None)}`` from the bullets right after header line ``h``."""
    indent: int | None = None
    out: dict[str, tuple[int, int | None]] = {}
    for line in lines[h + 1:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        m = _BULLET.match(line)
        if m and (indent is None or depth == indent):
            indent = depth
            count = int(m[3][1:-1]) if m[3] else 1
            size = _TYPE_SIZES[m[4]] * count if m[4] else None
            out[m[2]] = (int(m[5]), size)
        elif indent is not None and depth < indent and line.lstrip()[:1] in "*-":
            break
    return out


def _table_fields(lines: list[str], h: int) -> dict[str, tuple[int, int | None]]:
    out: dict[str, tuple[int, int | None]] = {}
    for line in lines[h + 1:]:
        m = _ROW.match(line)
        if m:
            out[m[3]] = (int(m[1]), int(m[2]))
        elif out and not line.startswith("|"):
            break
    return out


def spec_layouts() -> dict[str, tuple[int, dict[str, tuple[int, int | None]]]]:
    """``{struct: (size, {field: (offset, size)})}`` as the spec's §4 states them."""
    lines = _spec_section4()
    found: dict[str, tuple[int, dict[str, tuple[int, int | None]]]] = {}
    for h, line in enumerate(lines):
        m = _HEADER.search(line)
        if not m or m[1] in found:
            continue
        fields = _bullet_fields(lines, h) or _table_fields(lines, h)
        if fields:
            found[m[1]] = (int(m[2]), fields)
    return found


def test_spec_parser_finds_every_struct() -> None:
    """The parser itself: every struct of §4.2 with a plausible field count."""
    layouts = spec_layouts()
    assert set(layouts) == set(abi.STRUCTS)
    assert len(layouts["xen_sysctl_livepatch_list"][1]) == 11
    assert layouts["xen_livepatch_name"][1]["pad"] == (10, 6)


@pytest.mark.parametrize("struct_name", sorted(abi.STRUCTS))
def test_layout_matches_spec_text(struct_name: str) -> None:
    size, fields = spec_layouts()[struct_name]
    cls = abi.STRUCTS[struct_name]
    assert ctypes.sizeof(cls) == size
    for field, (offset, fsize) in fields.items():
        desc = getattr(cls, field)
        assert desc.offset == offset, f"{struct_name}.{field}"
        if fsize is not None:
            assert desc.size == fsize, f"{struct_name}.{field}"


# ------------------------------------------------------------------------------------------------
# The same structs declared in C, as the spec describes them, measured by gcc

C_DECLS = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
typedef uint64_t handle64 __attribute__((aligned(8)));  /* XEN_GUEST_HANDLE_64 */
struct xen_livepatch_name { handle64 name; uint16_t size; uint16_t pad[3]; };
struct xen_sysctl_livepatch_upload { struct xen_livepatch_name name; uint64_t size;
                                     handle64 payload; };
struct xen_livepatch_status { uint32_t state; int32_t rc; };
struct xen_sysctl_livepatch_get { struct xen_livepatch_name name;
                                  struct xen_livepatch_status status; };
struct xen_sysctl_livepatch_list { uint32_t version, idx, nr, pad, name_total_size,
    metadata_total_size; handle64 status, name, len, metadata, metadata_len; };
struct xen_sysctl_livepatch_action { struct xen_livepatch_name name; uint32_t cmd, timeout,
                                     flags, pad; };
struct xen_sysctl_livepatch_op { uint32_t cmd; uint32_t pad; union {
    struct xen_sysctl_livepatch_upload upload; struct xen_sysctl_livepatch_get get;
    struct xen_sysctl_livepatch_list list; struct xen_sysctl_livepatch_action action; } u; };
struct xen_sysctl { uint32_t cmd; uint32_t interface_version;
    union { struct xen_sysctl_livepatch_op livepatch_op; uint8_t pad[128]; } u; };
#define F(s, f) printf("F %s %s %zu %zu\n", #s, #f, offsetof(struct s, f), \
                       sizeof(((struct s *)0)->f))
#define S(s) printf("S %s %zu\n", #s, sizeof(struct s))
int main(void) {
"""


def _c_program() -> str:
    body = []
    for name, cls in abi.STRUCTS.items():
        body.append(f"S({name});")
        body += [f"F({name}, {f});" for f, _ in cls._fields_ if not f.startswith("_gap")]
    return C_DECLS + "\n".join(body) + "\nreturn 0; }\n"


@pytest.fixture(scope="module")
def gcc_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, int]]:
    work = tmp_path_factory.mktemp("abi")
    src, exe = work / "layout.c", work / "layout"
    src.write_text(_c_program())
    subprocess.run(["gcc", "-std=c11", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out: dict[str, dict[str, int]] = {}
    for line in subprocess.run([str(exe)], check=True, capture_output=True,
                               text=True).stdout.splitlines():
        parts = line.split()
        if parts[0] == "S":
            out.setdefault(parts[1], {})["<size>"] = int(parts[2])
        else:
            out.setdefault(parts[1], {})[parts[2]] = int(parts[3])
            out[parts[1]][parts[2] + "<size>"] = int(parts[4])
    return out


@pytest.mark.parametrize("struct_name", sorted(abi.STRUCTS))
def test_layout_matches_gcc(struct_name: str, gcc_layout: dict[str, dict[str, int]]) -> None:
    cls = abi.STRUCTS[struct_name]
    measured = gcc_layout[struct_name]
    assert measured["<size>"] == ctypes.sizeof(cls)
    for field, _ in cls._fields_:
        if field.startswith("_gap"):
            continue
        assert measured[field] == getattr(cls, field).offset, f"{struct_name}.{field}"
        assert measured[field + "<size>"] == getattr(cls, field).size, f"{struct_name}.{field}"


def test_builder_refuses_a_layout_ctypes_would_pad() -> None:
    """A table whose u64 sits at offset 4 cannot be honoured without packing: refuse at import."""
    bad = {"cmd": xen_abi.StructField(0, 4), "interface_version": xen_abi.StructField(4, 8),
           "u": xen_abi.StructField(16, 120)}
    with pytest.raises(AssertionError):
        abi.build_struct("xen_sysctl", bad)


def test_privcmd_ioctl_number_is_iowr_none_p_0_48() -> None:
    """_IOC(_IOC_NONE, 'P', 0, sizeof(privcmd_hypercall)), computed from the ioctl encoding."""
    ioc_none, nrshift, typeshift, sizeshift = 0, 0, 8, 16
    expected = (ioc_none << 30) | (ctypes.sizeof(abi.PrivcmdHypercall) << sizeshift) | \
        (ord("P") << typeshift) | (0 << nrshift)
    assert expected == xen_abi.IOCTL_PRIVCMD_HYPERCALL


# ------------------------------------------------------------------------------------------------
# Encoding: what SysctlBackend puts in memory, decoded with the spec's offsets


class RecordingTransport:
    """Captures the xen_sysctl (and the name it points to) at hypercall time."""

    description = "recording"

    def __init__(self, result: int = 0, fail: int = 0) -> None:
        self.calls: list[tuple[int, bytes, bytes]] = []
        self.result, self.fail = result, fail

    def alloc(self, size: int) -> SimBuffer:
        return SimBuffer(size)

    def hypercall(self, op: int, *args: int) -> int:
        raw = ctypes.string_at(args[0], 136)
        name_ptr, name_size = struct.unpack_from("<QH", raw, 16)
        name = ctypes.string_at(name_ptr, name_size) if name_ptr else b""
        self.calls.append((op, raw, name))
        if self.fail:
            raise OSError(self.fail, os.strerror(self.fail))
        return self.result

    def close(self) -> None:
        pass


def _spec_offset(struct_name: str, field: str) -> int:
    return spec_layouts()[struct_name][1][field][0]


def test_action_encoding_at_spec_offsets() -> None:
    tr = RecordingTransport()
    backend = SysctlBackend(tr, interface_version=0x15)
    backend.action("fix-1", xen_abi.LIVEPATCH_ACTION_APPLY, 2_000_000,
                   xen_abi.LIVEPATCH_ACTION_APPLY_NODEPS)
    op, raw, name = tr.calls[0]
    u = _spec_offset("xen_sysctl", "u")
    act = u + _spec_offset("xen_sysctl_livepatch_op", "u")
    assert op == 35
    assert struct.unpack_from("<II", raw, 0) == (27, 0x15)
    assert struct.unpack_from("<II", raw, u) == (3, 0)  # ACTION, pad
    assert name == b"fix-1\0"
    assert struct.unpack_from("<H6s", raw, act + 8) == (6, b"\0" * 6)
    fields = [_spec_offset("xen_sysctl_livepatch_action", f)
              for f in ("cmd", "timeout", "flags", "pad")]
    assert [struct.unpack_from("<I", raw, act + o)[0] for o in fields] == [3, 2_000_000, 1, 0]


def test_upload_encoding_points_at_the_payload() -> None:
    tr = RecordingTransport()
    SysctlBackend(tr, interface_version=0x15).upload("p", b"\x7fELF-bytes")
    _, raw, _ = tr.calls[0]
    up = _spec_offset("xen_sysctl", "u") + _spec_offset("xen_sysctl_livepatch_op", "u")
    assert struct.unpack_from("<I", raw, 8)[0] == 0  # UPLOAD
    size = struct.unpack_from("<Q", raw, up + _spec_offset("xen_sysctl_livepatch_upload",
                                                            "size"))[0]
    ptr = struct.unpack_from("<Q", raw, up + _spec_offset("xen_sysctl_livepatch_upload",
                                                           "payload"))[0]
    assert size == 10
    assert ptr  # the payload was freed after the call, so only the pointer is checked


def test_interface_version_detection_falls_back_to_0x16_on_eacces() -> None:
    class Picky(RecordingTransport):
        def hypercall(self, op: int, *args: int) -> int:
            version = struct.unpack_from("<I", ctypes.string_at(args[0], 8), 4)[0]
            self.calls.append((op, b"", b""))
            if version != 0x16:
                raise OSError(xen_abi.EACCES, "mismatch")
            return 0

    tr = Picky()
    backend = SysctlBackend(tr)
    assert backend.interface_version() == 0x16
    assert len(tr.calls) == 2
    backend.get("x")  # cached: one more call, straight at 0x16
    assert len(tr.calls) == 3


def test_errors_keep_errno_and_busy_is_retryable() -> None:
    with pytest.raises(HypervisorBusy) as busy:
        SysctlBackend(RecordingTransport(fail=xen_abi.EBUSY), 0x15).get("x")
    assert busy.value.errno_value == xen_abi.EBUSY and busy.value.return_code == 4
    with pytest.raises(HypercallError) as hard:
        SysctlBackend(RecordingTransport(fail=xen_abi.ENOENT), 0x15).get("x")
    assert not isinstance(hard.value, HypervisorBusy) and hard.value.return_code == 1
    assert "ENOENT" in str(hypercall_error("GET x", -xen_abi.ENOENT))


@pytest.mark.parametrize("name", ["", "a\0b", "n" * 128])
def test_bad_names_are_usage_errors(name: str) -> None:
    with pytest.raises(UsageError):
        encode_name(name)
    assert encode_name("n" * 127) == b"n" * 127 + b"\0"


def test_timeout_must_fit_u32() -> None:
    with pytest.raises(UsageError):
        SysctlBackend(RecordingTransport(), 0x15).action("x", 3, 2**32, 0)


# ------------------------------------------------------------------------------------------------
# The privcmd transport, as far as it runs without Xen


def test_locked_fallback_buffer_is_resident_and_usable() -> None:
    buf = _locked_anonymous(3 * 4096)
    try:
        ctypes.memmove(buf.address, b"xyz", 3)
        assert ctypes.string_at(buf.address, 3) == b"xyz"
        assert buf.size == 3 * 4096 and buf.locked
    finally:
        buf.free()


def test_privcmd_missing_device_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="privcmd"):
        PrivcmdTransport(str(tmp_path / "no-such-privcmd"))


def test_privcmd_hypercall_reaches_the_ioctl(tmp_path: Path) -> None:
    """On a non-privcmd fd the kernel answers ENOTTY: the ioctl path itself runs."""
    dev = tmp_path / "fake"
    dev.write_bytes(b"")
    tr = PrivcmdTransport(str(dev), use_hypercall_dev=False)
    try:
        with pytest.raises(OSError) as exc:
            tr.hypercall(xen_abi.HYPERVISOR_SYSCTL, 0)
        assert exc.value.errno == 25  # ENOTTY: a regular file, not the privcmd driver
    finally:
        tr.close()


def test_libxc_backend_without_xen_is_a_usage_error() -> None:
    """Missing library, or a library that cannot open privcmd: one clear UsageError."""
    from xsbuild.hypercall import privcmd
    from xsbuild.hypercall.libxc import LibxcBackend

    with pytest.raises(UsageError, match="libxenctrl"):
        LibxcBackend("libxenctrl-that-does-not-exist.so")
    if not privcmd.privcmd_available():
        with pytest.raises(UsageError):
            LibxcBackend()
