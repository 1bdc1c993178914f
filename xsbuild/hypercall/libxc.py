"""A backend over Xen's own C library, libxenctrl, loaded with ctypes (spec §4.3).

For hosts where the Xen tools are installed and one would rather let the library handle
hypercall buffers and interface versions.  The library is built for one sysctl interface
version: libxenctrl.so.4.17 .. 4.20 speak 0x15, 4.21 and later 0x16.  Every call returns 0 or -1
with errno (``use_errno``), except where noted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re

from xsbuild import xen_abi
from xsbuild.errors import UsageError
from xsbuild.hypercall import abi
from xsbuild.hypercall.backend import (
    PayloadEntry,
    Status,
    encode_name,
    hypercall_error,
    version_from_xenver,
)
from xsbuild.xen_versions import XenVersion

LIBRARY_NAMES = ("libxenctrl.so.4.17", "libxenctrl.so.4.18", "libxenctrl.so.4.19",
                 "libxenctrl.so.4.20", "libxenctrl.so.4.21", "libxenctrl.so.4.22")
_FIRST_0X16 = (4, 21)  # the release whose sysctl interface is 0x16

_u32p = ctypes.POINTER(ctypes.c_uint32)
_uintp = ctypes.POINTER(ctypes.c_uint)


def _open_library(name: str | None) -> tuple[ctypes.CDLL, str]:
    names = [name] if name else [*LIBRARY_NAMES, ctypes.util.find_library("xenctrl")]
    for candidate in filter(None, names):
        try:
            return ctypes.CDLL(candidate, use_errno=True), candidate
        except OSError:
            continue
    raise UsageError("libxenctrl is not installed (package libxenmisc4.17 on Debian); use "
                     "--backend privcmd, which needs no library")


def _declare(lib: ctypes.CDLL) -> None:
    """Prototypes, so ctypes passes 64-bit pointers and the right integer widths."""
    vp, cp, u32, uint = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint
    lib.xc_interface_open.restype = vp
    lib.xc_interface_open.argtypes = [vp, vp, uint]
    lib.xc_interface_close.argtypes = [vp]
    # 4.19+ add a trailing ``bool force``; on x86-64 an extra argument is harmless to 4.17.
    lib.xc_livepatch_upload.argtypes = [vp, cp, vp, u32, ctypes.c_bool]
    lib.xc_livepatch_get.argtypes = [vp, cp, ctypes.POINTER(abi.XenLivepatchStatus)]
    lib.xc_livepatch_list_get_sizes.argtypes = [vp, _uintp, _u32p, _u32p]
    lib.xc_livepatch_list.argtypes = [vp, uint, uint, ctypes.POINTER(abi.XenLivepatchStatus),
                                      cp, _u32p, u32, cp, _u32p, u32, _uintp, _uintp]
    for action in ("apply", "revert", "unload", "replace"):
        getattr(lib, f"xc_livepatch_{action}").argtypes = [vp, cp, u32, u32]
    lib.xc_version.argtypes = [vp, ctypes.c_int, vp]


class LibxcBackend:
    """A :class:`~xsbuild.hypercall.backend.Backend` calling ``xc_livepatch_*``."""

    def __init__(self, library: str | None = None) -> None:
        self.lib, self.library = _open_library(library)
        _declare(self.lib)
        self.xch = self.lib.xc_interface_open(None, None, 0)
        if not self.xch:
            err = ctypes.get_errno()
            raise UsageError(f"xc_interface_open failed (errno {err}): run as root in a Xen "
                             "dom0")
        self.description = f"libxenctrl ({self.library})"

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise hypercall_error(what, ctypes.get_errno() or xen_abi.EINVAL)
        return rc

    def interface_version(self) -> int:
        """The library's compiled-in version, from its soname (it cannot speak another)."""
        m = re.search(r"\.so\.(\d+)\.(\d+)", self.library)
        if m and (int(m[1]), int(m[2])) >= _FIRST_0X16:
            return xen_abi.SYSCTL_INTERFACE_VERSION_4_21
        return xen_abi.SYSCTL_INTERFACE_VERSION_4_17

    def build_id(self) -> bytes:
        room = 1024
        buf = ctypes.create_string_buffer(xen_abi.XEN_BUILD_ID_HEADER_SIZE + room)
        ctypes.c_uint32.from_buffer(buf).value = room
        size = self._check(self.lib.xc_version(self.xch, xen_abi.XENVER_BUILD_ID, buf),
                           "XENVER_build_id")
        start = xen_abi.XEN_BUILD_ID_HEADER_SIZE
        return buf.raw[start:start + size]

    def xen_version(self) -> XenVersion:
        packed = self._check(self.lib.xc_version(self.xch, xen_abi.XENVER_VERSION, None),
                             "XENVER_version")
        extra = ctypes.create_string_buffer(xen_abi.XEN_EXTRAVERSION_LEN)
        self._check(self.lib.xc_version(self.xch, xen_abi.XENVER_EXTRAVERSION, extra),
                    "XENVER_extraversion")
        return version_from_xenver(packed, extra.value.decode("ascii", "replace"))

    def upload(self, name: str, data: bytes, flags: int = 0) -> None:
        raw = encode_name(name)
        buf = ctypes.create_string_buffer(data, len(data))
        force = bool(flags & xen_abi.LIVEPATCH_FLAG_FORCE)  # 4.19+'s ``bool force`` argument
        self._check(self.lib.xc_livepatch_upload(self.xch, raw, buf, len(data), force),
                    f"UPLOAD {name}")

    def get(self, name: str) -> Status:
        status = abi.XenLivepatchStatus()
        self._check(self.lib.xc_livepatch_get(self.xch, encode_name(name),
                                              ctypes.byref(status)), f"GET {name}")
        return Status(status.state, status.rc)

    def list(self) -> list[PayloadEntry]:
        nr, name_total, meta_total = ctypes.c_uint(), ctypes.c_uint32(), ctypes.c_uint32()
        self._check(self.lib.xc_livepatch_list_get_sizes(
            self.xch, ctypes.byref(nr), ctypes.byref(name_total), ctypes.byref(meta_total)),
            "LIST (sizes)")
        count = nr.value
        if count == 0:
            return []
        info = (abi.XenLivepatchStatus * count)()
        lens, mlens = (ctypes.c_uint32 * count)(), (ctypes.c_uint32 * count)()
        names = ctypes.create_string_buffer(max(name_total.value, 1))
        metas = ctypes.create_string_buffer(max(meta_total.value, 1))
        done, left = ctypes.c_uint(), ctypes.c_uint()
        self._check(self.lib.xc_livepatch_list(
            self.xch, count, 0, info, names, lens, name_total.value, metas, mlens,
            meta_total.value, ctypes.byref(done), ctypes.byref(left)), "LIST")
        return _rows(info, names.raw, lens, metas.raw, mlens, done.value)

    def action(self, name: str, cmd: int, timeout_ns: int, flags: int = 0) -> None:
        func = {xen_abi.LIVEPATCH_ACTION_APPLY: self.lib.xc_livepatch_apply,
                xen_abi.LIVEPATCH_ACTION_REVERT: self.lib.xc_livepatch_revert,
                xen_abi.LIVEPATCH_ACTION_UNLOAD: self.lib.xc_livepatch_unload,
                xen_abi.LIVEPATCH_ACTION_REPLACE: self.lib.xc_livepatch_replace}[cmd]
        self._check(func(self.xch, encode_name(name), timeout_ns, flags), f"ACTION {name}")

    def close(self) -> None:
        if self.xch:
            self.lib.xc_interface_close(self.xch)
            self.xch = None


def _rows(info: ctypes.Array, names: bytes, lens: ctypes.Array, metas: bytes,
          mlens: ctypes.Array, count: int) -> list[PayloadEntry]:
    out: list[PayloadEntry] = []
    npos = mpos = 0
    for k in range(count):
        name = names[npos:npos + lens[k]].rstrip(b"\0").decode(errors="replace")
        out.append(PayloadEntry(name, info[k].state, info[k].rc, metas[mpos:mpos + mlens[k]]))
        npos += lens[k]
        mpos += mlens[k]
    return out
