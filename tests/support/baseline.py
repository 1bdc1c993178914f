"""The "behaviour unchanged" guard's baseline: xsbuild as it was at a fixed commit.

:func:`baseline_checkout` extracts the package at :data:`BASE_COMMIT` with ``git archive`` into
a scratch folder; :func:`xsbuild_at` runs ``python -m xsbuild`` with that folder (or the current
checkout) first on ``PYTHONPATH``.  The guard tests compare what both produce in the same run, so
no digest is ever hard-coded: a new compiler changes both sides alike.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

REPO = Path(__file__).resolve().parents[2]
# main's HEAD when the differ was redesigned (issue 11): the behaviour every later commit keeps.
BASE_COMMIT = "76bbfd1"


def baseline_missing() -> str:
    """Why the baseline cannot be extracted here ("" if it can)."""
    try:
        proc = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e",
                               f"{BASE_COMMIT}^{{commit}}"], capture_output=True, text=True,
                              check=False)
    except FileNotFoundError:
        return "git is not installed"
    if proc.returncode != 0:
        return f"git history does not hold the base commit {BASE_COMMIT} (shallow clone?)"
    return ""


def baseline_checkout(dest: Path) -> Path:
    """Extract the base commit's tree into ``dest`` (``git archive | tar -x``); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", BASE_COMMIT], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def xsbuild_at(code: Path, *args: str | Path, timeout: float = 600,
               cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """``python -m xsbuild ARGS`` running the package found in ``code``."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    # -P: the current directory (the repository, under pytest) must not shadow PYTHONPATH.
    return subprocess.run([sys.executable, "-P", "-m", "xsbuild", *map(str, args)], env=env,
                          capture_output=True, timeout=timeout, check=False, cwd=cwd)


# Intended changes since the base, by what they change: the outputs are compared with that
# difference taken out, and everything else must still be byte-identical.
COPY_NAME_RE = re.compile(rb"\.lp(?:\.[0-9a-f]{8})?(?:\.?\d+)?$")
# xsbuild.linker.copy_suffix: a payload-local copy of a hypervisor symbol was "<name>.lp", and
# two stacked payloads with the same copy could not be loaded together (-EEXIST); it is now
# "<name>.lp.<8 hex digits of the payload's name>".
COPY_NAMES = "payload-local copies are named per payload"


def without_copy_names(data: bytes) -> list[tuple[object, ...]]:
    """A payload with the names of its copies reduced to ``<name>.lp``: every section's header
    fields and bytes (the string and symbol tables and the build-id note, which follow from the
    names, by their symbols instead)."""
    elf = ELFFile(io.BytesIO(data))
    view: list[tuple[object, ...]] = []
    for sec in elf.iter_sections():
        fields = (sec.name, sec["sh_type"], sec["sh_flags"], sec["sh_addralign"])
        if sec.name in (".strtab", ".shstrtab", ".note.gnu.build-id"):
            view.append(fields)
        elif isinstance(sec, SymbolTableSection):
            view.append((*fields, tuple(
                (COPY_NAME_RE.sub(b".lp", sym.name.encode()), sym["st_value"], sym["st_size"],
                 sym["st_info"]["type"], sym["st_info"]["bind"], sym["st_shndx"])
                for sym in sec.iter_symbols())))
        else:
            view.append((*fields, sec.data()))
    return view
