"""Compile fixture sources exactly as Xen 4.17's x86 build compiles the hypervisor.

The flags are those of a real ``.o.cmd`` of Debian's tree (``common/.version.o.cmd``) minus what
ties them to that tree (its include paths, ``-include config.h``, dependency-file and prefix-map
options).  ``test_toolchain_flags_match_debian_tree`` re-derives them from the tree so that this
list cannot drift.  After gcc, ``objcopy --redefine-sym <file>.c=<dir>/<file>.c`` rewrites the
STT_FILE symbol as CONFIG_ENFORCE_UNIQUE_SYMBOLS does (target notes), which is what makes a static
``foo`` of ``common/bar.c`` known to the hypervisor as ``common/bar.c#foo``.

Objects are cached by content hash (source, headers, flags), so a session compiles each distinct
fixture once.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"
FIXTURE_INCLUDE = FIXTURES / "include"

DEBIAN_TREE = Path("/work/cache/xenbuild/xen-4.17.5+72-g01140da4e8/xen")
DEBIAN_XEN_SYMS = Path("/work/cache/xenbuild/ref/usr/lib/debug/boot/xen-syms-4.17-amd64")
REFERENCE_CMD = DEBIAN_TREE / "common" / ".version.o.cmd"

CC = "x86_64-linux-gnu-gcc"
LD = "ld"
OBJCOPY = "objcopy"
READELF = "readelf"

# Copied from common/.version.o.cmd of Debian's 4.17.5+72 build by flags_from_cmd().
XEN_CFLAGS: tuple[str, ...] = (
    "-m64", "-DBUILD_ID", "-fno-strict-aliasing", "-std=gnu99", "-Wall", "-Wstrict-prototypes",
    "-Wno-unused-but-set-variable", "-Wno-unused-local-typedefs", "-O2", "-fomit-frame-pointer",
    "-nostdinc", "-fno-builtin", "-fno-common", "-Werror", "-Wredundant-decls",
    "-Wno-pointer-arith", "-Wdeclaration-after-statement", "-Wvla", "-pipe", "-D__XEN__",
    "-Wa,--strip-local-absolute", "-ffunction-sections", "-fdata-sections",
    "-mindirect-branch=thunk-extern", "-mindirect-branch-register", "-fno-jump-tables",
    "-mfunction-return=thunk-extern", "-DXEN_IMG_OFFSET=0x200000", "-msoft-float", "-fno-pie",
    "-fno-stack-protector", "-fno-exceptions", "-fno-asynchronous-unwind-tables",
    "-Wnested-externs", "-DHAVE_AS_VMX", "-DHAVE_AS_SSE4_2", "-DHAVE_AS_EPT", "-DHAVE_AS_RDRAND",
    "-DHAVE_AS_FSGSBASE", "-DHAVE_AS_XSAVEOPT", "-DHAVE_AS_RDSEED", "-DHAVE_AS_CLAC_STAC",
    "-DHAVE_AS_CLWB", "-DHAVE_AS_QUOTED_SYM", "-DHAVE_AS_INVPCID", "-DHAVE_AS_MOVDIR",
    "-DHAVE_AS_ENQCMD", "-DHAVE_AS_NEGATIVE_TRUE", "-DHAVE_AS_NOPS_DIRECTIVE", "-mno-red-zone",
    "-fpic", "-mno-mmx", "-mno-sse", "-mskip-rax-setup", "-fcf-protection=branch",
    "-mmanual-endbr", "-fno-jump-tables", "-mpreferred-stack-boundary=3",
)

# Options of the .o.cmd that take the next word as their argument and are dropped with it.
_DROP_WITH_ARG = frozenset({"-MF", "-MQ", "-MT", "-include", "-o", "-c"})
# Options dropped alone: dependency generation and everything naming the build tree.
_DROP_PREFIXES = ("-MMD", "-MP", "-I", "-Wa,-I", "-ffile-prefix-map=", "-fdebug-prefix-map=",
                  "-D__OBJECT_LABEL__=")


class ToolchainError(RuntimeError):
    """A compiler, assembler, linker or binutils run failed; the message holds its stderr."""


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


def run(cmd: list[str], cwd: Path | None = None) -> str:
    """Run a tool; raise ToolchainError with its stderr if it fails; return stdout."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ToolchainError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


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

    def command(self, src: Path, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
        """The gcc command line for one fixture: Xen's flags, the fixture config header."""
        incs = [f"-I{d}" for d in self.include_dirs]
        return [CC, *self.cflags, "-include", str(FIXTURE_INCLUDE / "config.h"), *incs,
                *extra, "-c", str(src), "-o", str(out)]

    def compile_source(self, text: str, unique_name: str, extra: tuple[str, ...] = ()) -> Path:
        """Compile C ``text`` as the file ``unique_name`` (e.g. ``common/sched.c``).

        gcc sees a file named like the basename of ``unique_name`` (so its STT_FILE symbol is
        that basename, as in Xen), then objcopy renames the STT_FILE symbol to ``unique_name``.
        Returns the cached object path.
        """
        key = hashlib.sha256("\0".join(
            [text, unique_name, *self.cflags, *extra, self._headers]).encode()).hexdigest()[:24]
        out = self.cache_dir / f"{key}.o"
        if out.exists():
            return out
        base = Path(unique_name).name
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            src = Path(tmp) / base
            src.write_text(text)
            tmp_obj = Path(tmp) / (src.stem + ".o.tmp")
            run(self.command(src, tmp_obj, extra), cwd=Path(tmp))
            if base != unique_name:
                run([OBJCOPY, f"--redefine-sym={base}={unique_name}", str(tmp_obj)])
            os.replace(tmp_obj, out)  # atomic: concurrent sessions never see half an object
        return out

    def compile_file(self, src: Path, unique_name: str, extra: tuple[str, ...] = ()) -> Path:
        """Compile a fixture file on disk; see :meth:`compile_source`."""
        return self.compile_source(src.read_text(), unique_name, extra)

    def assemble(self, text: str, unique_name: str) -> Path:
        """Assemble a ``.S`` file with Xen's flags (its STT_FILE symbol is kept, as in Xen)."""
        key = hashlib.sha256("\0".join(["S", text, unique_name, *self.cflags]).encode())
        out = self.cache_dir / f"{key.hexdigest()[:24]}.o"
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            src = Path(tmp) / Path(unique_name).name
            src.write_text(text)
            tmp_obj = Path(tmp) / "out.o"
            run([CC, *self.cflags, "-D__ASSEMBLY__", "-c", str(src), "-o", str(tmp_obj)])
            os.replace(tmp_obj, out)
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
