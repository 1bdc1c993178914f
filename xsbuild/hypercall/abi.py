"""ctypes structures of the sysctl livepatch op (spec §4.1, §4.2), generated from ``xen_abi``.

Nothing here spells out an offset or a size: every structure is built from the ``*_LAYOUT`` and
``STRUCT_SIZES`` tables of :mod:`xsbuild.xen_abi`, and the builder refuses (at import) a table
that ctypes would lay out differently, so a wrong constant cannot silently produce a wrong
hypercall.  ``tests/test_hypercall_abi.py`` checks the result against the spec's tables and
against a C program compiled with gcc.

Handles (``XEN_GUEST_HANDLE_64``) are plain ``u64`` virtual addresses here: the caller puts the
address of a resident buffer into them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

from xsbuild import xen_abi
from xsbuild.xen_abi import StructField

# Fields whose type is not "unsigned integer of that size".  ``rc`` is a negative errno.
_SIGNED = {("xen_livepatch_status", "rc")}
_SCALARS: dict[int, type] = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32,
                             8: ctypes.c_uint64}


def _field_type(struct_name: str, field: str, size: int,
                nested: Mapping[str, type]) -> type:
    if field in nested:
        return nested[field]
    if (struct_name, field) in _SIGNED:
        return ctypes.c_int32
    if field == "pad" and size > 8:
        return ctypes.c_uint8 * size
    if field == "pad" and size == 6:  # xen_livepatch_name.pad[3]: three u16
        return ctypes.c_uint16 * 3
    return _SCALARS.get(size) or ctypes.c_uint8 * size


def build_struct(struct_name: str, layout: Mapping[str, StructField],
                 nested: Mapping[str, type] | None = None,
                 base: type = ctypes.Structure) -> type:
    """Make a ctypes Structure (or Union) named ``struct_name`` from a spec layout table.

    Gaps between fields become ``_gapN`` byte arrays; the tail is padded to
    ``STRUCT_SIZES[struct_name]``.  Raises ``AssertionError`` at import if ctypes disagrees
    with the table (an alignment the table does not account for).
    """
    nested = nested or {}
    size = xen_abi.STRUCT_SIZES[struct_name]
    fields: list[tuple[str, type]] = []
    pos = 0
    for fname, spec in sorted(layout.items(), key=lambda kv: kv[1].offset):
        if spec.offset > pos:
            fields.append((f"_gap{pos}", ctypes.c_uint8 * (spec.offset - pos)))
        ctype = _field_type(struct_name, fname, spec.size, nested)
        if ctypes.sizeof(ctype) != spec.size:
            raise AssertionError(f"{struct_name}.{fname}: ctypes size {ctypes.sizeof(ctype)} "
                                 f"!= {spec.size}")
        fields.append((fname, ctype))
        pos = spec.offset + spec.size
    if pos < size:
        fields.append((f"_gap{pos}", ctypes.c_uint8 * (size - pos)))
    cls = type(struct_name, (base,), {"_fields_": fields})
    _verify(cls, struct_name, layout, size)
    return cls


def _verify(cls: type, struct_name: str, layout: Mapping[str, StructField], size: int) -> None:
    if ctypes.sizeof(cls) != size:
        raise AssertionError(f"{struct_name}: ctypes size {ctypes.sizeof(cls)} != {size}")
    for fname, spec in layout.items():
        if getattr(cls, fname).offset != spec.offset:
            raise AssertionError(f"{struct_name}.{fname}: offset {getattr(cls, fname).offset} "
                                 f"!= {spec.offset}")


XenLivepatchName = build_struct("xen_livepatch_name", xen_abi.NAME_LAYOUT)
XenLivepatchStatus = build_struct("xen_livepatch_status", xen_abi.STATUS_LAYOUT)
XenSysctlLivepatchUpload = build_struct("xen_sysctl_livepatch_upload", xen_abi.UPLOAD_LAYOUT,
                                        {"name": XenLivepatchName})
XenSysctlLivepatchGet = build_struct("xen_sysctl_livepatch_get", xen_abi.GET_LAYOUT,
                                     {"name": XenLivepatchName, "status": XenLivepatchStatus})
XenSysctlLivepatchList = build_struct("xen_sysctl_livepatch_list", xen_abi.LIST_LAYOUT)
XenSysctlLivepatchAction = build_struct("xen_sysctl_livepatch_action", xen_abi.ACTION_LAYOUT,
                                        {"name": XenLivepatchName})


def _op_union() -> type:
    size = xen_abi.LIVEPATCH_OP_LAYOUT["u"].size
    members = {"upload": XenSysctlLivepatchUpload, "get": XenSysctlLivepatchGet,
               "list": XenSysctlLivepatchList, "action": XenSysctlLivepatchAction}
    fields = [*members.items(), ("raw", ctypes.c_uint8 * size)]
    cls = type("xen_sysctl_livepatch_op_u", (ctypes.Union,), {"_fields_": fields})
    if ctypes.sizeof(cls) != size:
        raise AssertionError(f"livepatch op union: size {ctypes.sizeof(cls)} != {size}")
    return cls


XenSysctlLivepatchOp = build_struct("xen_sysctl_livepatch_op", xen_abi.LIVEPATCH_OP_LAYOUT,
                                    {"u": _op_union()})


def _sysctl_union() -> type:
    size = xen_abi.SYSCTL_LAYOUT["u"].size
    fields = [("livepatch_op", XenSysctlLivepatchOp), ("raw", ctypes.c_uint8 * size)]
    cls = type("xen_sysctl_u", (ctypes.Union,), {"_fields_": fields})
    if ctypes.sizeof(cls) != size:
        raise AssertionError(f"sysctl union: size {ctypes.sizeof(cls)} != {size}")
    return cls


XenSysctl = build_struct("xen_sysctl", xen_abi.SYSCTL_LAYOUT, {"u": _sysctl_union()})

# Every generated structure by its C name, for the layout test.
STRUCTS: dict[str, type] = {
    "xen_sysctl": XenSysctl,
    "xen_sysctl_livepatch_op": XenSysctlLivepatchOp,
    "xen_livepatch_name": XenLivepatchName,
    "xen_sysctl_livepatch_upload": XenSysctlLivepatchUpload,
    "xen_sysctl_livepatch_get": XenSysctlLivepatchGet,
    "xen_livepatch_status": XenLivepatchStatus,
    "xen_sysctl_livepatch_list": XenSysctlLivepatchList,
    "xen_sysctl_livepatch_action": XenSysctlLivepatchAction,
}


class PrivcmdHypercall(ctypes.Structure):
    """``struct privcmd_hypercall {u64 op; u64 arg[5];}`` (spec §4.1), the ioctl argument.

    Linux's structure, not Xen's: its size is encoded in ``IOCTL_PRIVCMD_HYPERCALL``.
    """

    _fields_ = [("op", ctypes.c_uint64), ("arg", ctypes.c_uint64 * 5)]


assert ctypes.sizeof(PrivcmdHypercall) == (xen_abi.IOCTL_PRIVCMD_HYPERCALL >> 16) & 0x3FFF


def new_sysctl(interface_version: int, cmd: int) -> ctypes.Structure:
    """A zeroed ``xen_sysctl`` for the livepatch op ``cmd`` (pads are zero, as Xen demands)."""
    sysctl = XenSysctl()
    sysctl.cmd = xen_abi.XEN_SYSCTL_LIVEPATCH_OP
    sysctl.interface_version = interface_version
    sysctl.u.livepatch_op.cmd = cmd
    return sysctl
