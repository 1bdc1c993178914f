"""What every command shares: output-path checks, build-id options, names, the JSON error object.

One helper per rule, so that every command that writes a file refuses the same bad outputs with
the same one line and exit 2, and every ``--json`` failure prints the same error object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from xsbuild.errors import UsageError, XsbuildError

ERROR_SCHEMA = "xsbuild.error/1"

# ``ld --build-id`` makes ids of 8 (xxhash), 16 (md5, uuid) or 20 bytes (sha1, Xen's default).
# Xen accepts any non-empty note (spec §1.6), but a shorter id is the build-id of nothing, so a
# payload depending on it can never be applied: a typo or a truncated paste.
MIN_BUILD_ID_BYTES = 8


def check_output(output: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]],
                 option: str = "-o") -> Path:
    """Refuse an output that cannot be written whole or that would replace an input.

    The folder must exist (nothing creates it behind the user's back), and the output must not
    be any input, by name or through a symbolic or hard link (the same device and inode).
    """
    out = Path(output)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        what = "is not a directory" if folder.exists() else "does not exist"
        raise UsageError(f"{option} {out}: directory {folder} {what}")
    if out.is_dir():
        raise UsageError(f"{option} {out}: is a directory")
    try:
        out_stat = out.stat()
    except OSError:
        return out  # a new file: it cannot be an input
    for item in inputs:
        try:
            in_stat = os.stat(item)
        except OSError:
            continue
        if (in_stat.st_dev, in_stat.st_ino) == (out_stat.st_dev, out_stat.st_ino):
            same = "" if os.fspath(item) == os.fspath(out) else f" (the same file as {item})"
            raise UsageError(f"{option} {out} is an input{same}: writing it would destroy it; "
                             "choose another output file")
    return out


def parse_build_id_option(option: str, text: str | None) -> bytes | None:
    """A build-id given as hex on the command line (``readelf -n``/``xl info`` form), checked."""
    if text is None:
        return None
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = bytes.fromhex(cleaned)
    except ValueError:
        raise UsageError(f"{option} {text!r}: a build-id is hex digits, an even number of them, "
                         "e.g. 39a640e6f1412319235087391df9f1c5e13ae920") from None
    if len(value) < MIN_BUILD_ID_BYTES:
        raise UsageError(f"{option} {text!r}: a build-id of {len(value)} byte(s) belongs to no "
                         f"hypervisor or payload (ld makes 8, 16 or 20 bytes; Xen's are 20): "
                         "copy it whole from `xsbuild inspect` or `readelf -n`")
    return value


def check_name(option: str, name: str | None) -> str | None:
    """``--name ""`` is a mistake, not a request for the default."""
    if name is not None and not name.strip():
        raise UsageError(f"{option} must not be empty (leave it out for the default)")
    return name


def error_object(command: str | None, exc: BaseException, exit_code: int) -> dict[str, object]:
    """The object ``--json`` prints on stdout when a command fails (docs/json-schema)."""
    from xsbuild import xen_abi

    errno_value = getattr(exc, "errno_value", 0)
    problems = getattr(exc, "problems", None)
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    return {"schema": ERROR_SCHEMA, "command": command, "status": type(exc).__name__,
            "error": message, "exit_code": exit_code,
            "errno": xen_abi.errno_name(errno_value) if errno_value else None,
            "refused": list(problems) if problems else []}


def print_error_object(command: str | None, exc: BaseException, exit_code: int) -> None:
    try:
        print(json.dumps(error_object(command, exc, exit_code), indent=2), flush=True)
    except BrokenPipeError:  # `... --json | head`: the reader left; the stderr line remains
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # and no second complaint at exit


def mark_reported(exc: XsbuildError) -> XsbuildError:
    """The command printed its own ``--json`` result for this failure (``diff``'s refusal)."""
    exc.json_reported = True  # type: ignore[attr-defined]
    return exc
