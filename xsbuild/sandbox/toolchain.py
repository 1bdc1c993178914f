"""Compile and link small C sources exactly as Xen 4.17's x86 build compiles the hypervisor.

The flags are those of a real ``.o.cmd`` of Debian's tree (``common/.version.o.cmd``) minus what
ties them to that tree (its include paths, ``-include config.h``, dependency-file and prefix-map
options); ``tests/test_loader.py::test_toolchain_flags_match_debian_tree`` re-derives them from
the tree so that this list cannot drift.  After gcc,
``objcopy --redefine-sym <file>.c=<dir>/<file>.c`` rewrites the STT_FILE symbol as
CONFIG_ENFORCE_UNIQUE_SYMBOLS does (target notes), which is what
makes a static ``foo`` of ``common/bar.c`` known to the hypervisor as ``common/bar.c#foo``.

:func:`link_image` links such objects into a static ELF that stands in for ``xen-syms``: a
build-id note, one STT_FILE symbol ahead of each object's locals, hidden globals kept GLOBAL, so
statics resolve as ``path#name`` exactly as in the hypervisor (spec §7).  Linked at
:data:`xsbuild.sandbox.loader.IMAGE_BASE` a user process can map and run it; linked at Xen's own
address it is readable, not runnable.

Used by ``xsbuild demo`` and by the test suite's fixtures.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from xsbuild.errors import UsageError

CC = "x86_64-linux-gnu-gcc"
LD = "ld"
OBJCOPY = "objcopy"

# The return and indirect-branch thunks that -mfunction-return/-mindirect-branch=thunk-extern
# code calls; every image links them.
THUNKS = Path(__file__).resolve().parents[1] / "data" / "sandbox" / "thunks.S"
THUNKS_NAME = "arch/x86/indirect-thunk.S"

# Copied from common/.version.o.cmd of Debian's 4.17.5+72 build (see the module docstring).
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


class ToolchainError(UsageError):
    """A compiler, assembler, linker or binutils run failed (or the tool is missing)."""


def run(cmd: Sequence[str], cwd: Path | None = None) -> str:
    """Run a tool; raise :class:`ToolchainError` with its stderr if it fails; return stdout."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ToolchainError(f"{cmd[0]} is not installed (Debian: apt-get install "
                             "build-essential)") from None
    if proc.returncode != 0:
        raise ToolchainError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def compile_c(text: str, unique_name: str, out: Path, *, cflags: Sequence[str] = XEN_CFLAGS,
              includes: Sequence[str] = (), extra: Sequence[str] = ()) -> Path:
    """Compile C ``text`` as the file ``unique_name`` (``common/sched.c``) into ``out``.

    gcc sees a file named like the basename of ``unique_name`` (so its STT_FILE symbol is that
    basename, as in Xen), then objcopy renames the STT_FILE symbol to ``unique_name``.  ``out``
    appears atomically: concurrent users never see half an object.  ``includes`` are extra
    gcc options placed before the source (``-I``, ``-include``).
    """
    base = Path(unique_name).name
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / base
        src.write_text(text)
        tmp_obj = Path(tmp) / (src.stem + ".o.tmp")
        run([CC, *cflags, *includes, *extra, "-c", str(src), "-o", str(tmp_obj)], cwd=Path(tmp))
        if base != unique_name:
            run([OBJCOPY, f"--redefine-sym={base}={unique_name}", str(tmp_obj)])
        os.replace(tmp_obj, out)
    return out


def assemble(text: str, unique_name: str, out: Path, *,
             cflags: Sequence[str] = XEN_CFLAGS) -> Path:
    """Assemble a ``.S`` file with Xen's flags (its STT_FILE symbol is kept, as in Xen)."""
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / Path(unique_name).name
        src.write_text(text)
        tmp_obj = Path(tmp) / "out.o"
        run([CC, *cflags, "-D__ASSEMBLY__", "-c", str(src), "-o", str(tmp_obj)])
        os.replace(tmp_obj, out)
    return out


def link_image(objects: Sequence[Path], out: Path, base: int) -> Path:
    """Link ``objects`` into the static image ``out`` at ``base``, atomically."""
    flags = ["-static", f"-Ttext-segment={base:#x}", "-e", "0", "-z", "noexecstack",
             "-z", "norelro"]
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        run([LD, "-melf_x86_64", "--build-id=sha1", *flags, "-o", tmp, *map(str, objects)])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
