"""The test suite's compiler: Xen's flags (:mod:`xsbuild.sandbox.toolchain`), the fixture
headers, and a content-hash object cache shared by a whole test session, plus readelf helpers.

``flags_from_cmd`` re-derives the flag list from a real ``.o.cmd`` of Debian's tree so that
``test_toolchain_flags_match_debian_tree`` catches any drift of
:data:`xsbuild.sandbox.toolchain.XEN_CFLAGS`.
"""

from __future__ import annotations

import hashlib
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from xsbuild.sandbox.toolchain import (  # noqa: F401 - re-exported for the tests
    CC,
    LD,
    OBJCOPY,
    XEN_CFLAGS,
    ToolchainError,
    assemble,
    compile_c,
    run,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
FIXTURE_INCLUDE = FIXTURES / "include"
READELF = "readelf"

# Options of the .o.cmd that take the next word as their argument and are dropped with it.
_DROP_WITH_ARG = frozenset({"-MF", "-MQ", "-MT", "-include", "-o", "-c"})
# Options dropped alone: dependency generation and everything naming the build tree.
_DROP_PREFIXES = ("-MMD", "-MP", "-I", "-Wa,-I", "-ffile-prefix-map=", "-fdebug-prefix-map=",
                  "-D__OBJECT_LABEL__=")


def flags_from_cmd(cmd_text: str) -> tuple[str, ...]:
    """The tree-independent gcc flags of a Kbuild ``.o.cmd`` file's ``cmd_`` line."""
    line = next(ln for ln in cmd_text.splitlines() if ln.startswith("cmd_"))
    words = shlex.split(line.split(":=", 1)[1])[1:]  # drop the compiler itself
    flags: list[str] = []
    skip = False
    for word in words:
        if skip:
            skip = False
            continue
        if word in _DROP_WITH_ARG:
            skip = True
            continue
        if word.startswith(_DROP_PREFIXES) or word.endswith((".c", ".S")):
            continue
        flags.append(word)
    return tuple(flags)


def _headers_digest() -> str:
    # Every fixture header participates in every object's cache key: cheap, and never stale.
    digest = hashlib.sha256()
    for header in sorted(FIXTURE_INCLUDE.glob("*.h")):
        digest.update(header.name.encode() + b"\0" + header.read_bytes())
    return digest.hexdigest()


@dataclass
class Toolchain:
    """Compiles fixture sources into a cache directory keyed by content.

    ``cache_dir`` is shared by a whole test session; the object for a given (source text,
    unique name, flags, headers) is built once and reused.
    """

    cache_dir: Path
    cflags: tuple[str, ...] = XEN_CFLAGS
    include_dirs: tuple[Path, ...] = (FIXTURE_INCLUDE,)
    _headers: str = field(default="", init=False, repr=False)

    def __post_init__(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._headers = _headers_digest()

    def includes(self) -> list[str]:
        """The fixture config header and include directories, as gcc options."""
        return ["-include", str(FIXTURE_INCLUDE / "config.h"),
                *(f"-I{d}" for d in self.include_dirs)]

    def _cached(self, *key_parts: str) -> Path:
        key = hashlib.sha256("\0".join([*key_parts, *self.cflags]).encode()).hexdigest()[:24]
        return self.cache_dir / f"{key}.o"

    def compile_source(self, text: str, unique_name: str, extra: tuple[str, ...] = ()) -> Path:
        """Compile C ``text`` as the file ``unique_name`` (e.g. ``common/sched.c``); see
        :func:`xsbuild.sandbox.toolchain.compile_c`; a ``.S`` name is assembled instead
        (:meth:`assemble`).  Returns the cached object path."""
        if unique_name.endswith(".S"):
            return self.assemble(text, unique_name)
        out = self._cached(text, unique_name, *extra, self._headers)
        if not out.exists():
            compile_c(text, unique_name, out, cflags=self.cflags, includes=self.includes(),
                      extra=extra)
        return out

    def compile_file(self, src: Path, unique_name: str, extra: tuple[str, ...] = ()) -> Path:
        """Compile a fixture file on disk; see :meth:`compile_source`."""
        return self.compile_source(src.read_text(), unique_name, extra)

    def assemble(self, text: str, unique_name: str) -> Path:
        """Assemble a ``.S`` file with Xen's flags (its STT_FILE symbol is kept, as in Xen)."""
        out = self._cached("S", text, unique_name)
        if not out.exists():
            assemble(text, unique_name, out, cflags=self.cflags)
        return out


def readelf(*args: str | Path) -> str:
    """Run ``readelf -W`` and fail on any warning it prints (stderr)."""
    proc = subprocess.run([READELF, "-W", *map(str, args)], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0 or proc.stderr.strip():
        raise ToolchainError(f"readelf {' '.join(map(str, args))}: rc={proc.returncode} "
                             f"{proc.stderr.strip()}")
    return proc.stdout


def relocation_offsets(obj: Path, section: str) -> list[int]:
    """Offsets (r_offset) of the relocations against ``section``, from real ``readelf -r``."""
    out = readelf("-r", obj)
    offsets: list[int] = []
    active = False
    for line in out.splitlines():
        if line.startswith("Relocation section"):
            active = f"'.rela{section}'" in line
            continue
        parts = line.split()
        if active and parts and all(c in "0123456789abcdef" for c in parts[0]):
            offsets.append(int(parts[0], 16))
    return offsets


def section_sizes(obj: Path) -> dict[str, int]:
    """Section name -> size, from real ``readelf -S``."""
    sizes: dict[str, int] = {}
    for line in readelf("-S", obj).splitlines():
        line = line.strip()
        if not line.startswith("["):
            continue
        parts = line.split("]", 1)[1].split()
        if len(parts) >= 5 and parts[0] != "Name":
            sizes[parts[0]] = int(parts[4], 16)
    return sizes
