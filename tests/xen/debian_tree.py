"""Debian's built Xen 4.17.5+72 tree, and an exact recompile of one of its objects.

The tree is the one ``xsbuild build --debian 4.17.5+72-g01140da4e8-1`` keeps in the cache
(``<cache>/debian/<version>``, laid out as a ``shared/harness/build-xen.sh`` WORKDIR, bit-identical
to Debian's package).  ``$XSBUILD_XEN_TREE`` names another WORKDIR to use instead (one built by
build-xen.sh, say).  If neither holds a built tree, xsbuild builds it (about 100 s plus the
download, once per machine, shared by the product and the tests).  Nothing here writes into
the tree.

:func:`recompile` replays the ``cmd_...`` line of an object's ``.o.cmd`` file on a *copy* of the
source, then the ``objcopy --redefine-sym`` step that make runs after it (target-notes.md).  The
copy lives in a scratch folder; the compiler still runs in the tree's ``xen/`` folder so every
include path means what it meant in the real build, and two extra options make the copy
indistinguishable from the original: ``-iquote <dir of the original>`` (quoted includes next to
the source) and ``-ffile-prefix-map=<scratch>/=`` (``__FILE__`` reads ``common/version.c`` again).
For an unmodified source the result is byte-identical to the tree's object.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from xsbuild.debian import STAMP, debian_base, version_folder
from xsbuild.errors import XsbuildError

DEBIAN_XEN_VERSION = "4.17.5+72-g01140da4e8"
# Debian's shipped xen-syms (the -dbg package), where build-xen.sh unpacks it in its WORKDIR.
REF_XEN_SYMS = Path("ref/usr/lib/debug/boot/xen-syms-4.17-amd64")
TREE_ENV = "XSBUILD_XEN_TREE"

_CMD_LINE_RE = re.compile(r"^cmd_(\S+)\s*:=\s*(.*)$")
_BUILD_ID_RE = re.compile(r"Build ID:\s*([0-9a-f]+)")


class TreeError(RuntimeError):
    """The Debian tree is missing, incomplete, or cannot be built here."""


def read_build_id(elf: Path) -> str:
    """The GNU build-id of ``elf`` as hex, read by binutils' readelf (an independent reader)."""
    out = subprocess.run(["readelf", "-n", str(elf)], capture_output=True, text=True, check=True)
    match = _BUILD_ID_RE.search(out.stdout)
    if match is None:
        raise TreeError(f"{elf}: no GNU build-id note")
    return match.group(1)


@dataclass(frozen=True)
class DebianTree:
    """A build-xen.sh WORKDIR: the built source tree plus Debian's reference binaries."""

    workdir: Path

    @property
    def source_top(self) -> Path:
        """The unpacked Debian source package (``debian/`` and ``xen/`` inside)."""
        return self.workdir / f"xen-{DEBIAN_XEN_VERSION}"

    @property
    def xen_dir(self) -> Path:
        """Where make ran (``make -C xen``): every path of a ``.o.cmd`` is relative to it."""
        return self.source_top / "xen"

    @property
    def xen_syms(self) -> Path:
        """The tree's own linked hypervisor (same build-id as Debian's)."""
        return self.xen_dir / "xen-syms"

    @property
    def debian_xen_syms(self) -> Path:
        """Debian's shipped ``xen-syms`` from the -dbg package: what payloads are built against."""
        return self.workdir / REF_XEN_SYMS

    def is_built(self) -> bool:
        return self.xen_syms.is_file() and self.debian_xen_syms.is_file()

    def verify(self) -> None:
        """Fail unless the tree is built and still identical to Debian's binary."""
        if not self.is_built():
            raise TreeError(f"{self.workdir}: no built tree ({self.xen_syms} or "
                            f"{self.debian_xen_syms} missing)")
        ours, debian = read_build_id(self.xen_syms), read_build_id(self.debian_xen_syms)
        if ours != debian:
            raise TreeError(f"{self.xen_syms}: build-id {ours} is not Debian's {debian}: "
                            "was the tree modified in place?")

    @cached_property
    def build_env(self) -> dict[str, str]:
        """The environment debian/rules gives the compiler (as build-xen.sh recreates it)."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "MAKEFLAGS")}
        epoch = subprocess.run(["dpkg-parsechangelog", "-STimestamp"], cwd=self.source_top,
                               capture_output=True, text=True, check=True).stdout.strip()
        env.update(LC_ALL="C.UTF-8", TZ="UTC", SOURCE_DATE_EPOCH=epoch)
        return env


# --------------------------------------------------------------------------- finding the tree
def _candidate(path: Path) -> DebianTree:
    # Accept the WORKDIR itself or, leniently, its xen/ folder.
    if (path / "xen-syms").is_file() and path.name == "xen":
        return DebianTree(path.parents[1])
    return DebianTree(path)


def product_tree_dir() -> Path:
    """Where ``xsbuild build --debian`` keeps Debian's rebuilt tree (same layout as a
    build-xen.sh WORKDIR: ``ref/`` and ``xen-<version>/``): the suite shares it, so a machine
    builds Debian's hypervisor once for the product and the tests together."""
    return version_folder(f"{DEBIAN_XEN_VERSION}-1")


def find_tree() -> DebianTree | None:
    """The first built tree among ``$XSBUILD_XEN_TREE`` and the product's cache, or None."""
    env = os.environ.get(TREE_ENV)
    if env:
        tree = _candidate(Path(env))
        if not tree.is_built():
            raise TreeError(f"{TREE_ENV}={env} does not hold a tree built by build-xen.sh")
        return tree
    tree = DebianTree(product_tree_dir())
    return tree if tree.is_built() and (tree.source_top / STAMP).is_file() else None


def get_tree() -> DebianTree:
    """The verified Debian tree, built first (by xsbuild itself, as ``xsbuild build --debian``
    does, about 100 s plus the download) if none exists on this machine."""
    tree = find_tree()
    if tree is None:
        try:
            debian_base(f"{DEBIAN_XEN_VERSION}-1", jobs=os.cpu_count() or 2,
                        progress=lambda _line: None)
        except XsbuildError as exc:
            raise TreeError(f"building Debian's tree failed: {exc}") from exc
        tree = DebianTree(product_tree_dir())
    tree.verify()
    return tree


# --------------------------------------------------------------------------- one-object recompile
@dataclass(frozen=True)
class CompileCommand:
    """The recorded compile of one object, split into the parts a replay changes."""

    obj: str  # e.g. "common/version.o", relative to xen/
    argv: tuple[str, ...]
    source: str  # as given to gcc, e.g. "common/version.c"
    output: str  # "-o" argument, e.g. "common/.version.o.tmp"

    @property
    def needs_redefine(self) -> bool:
        """gcc wrote ``.<name>.o.tmp``: make then renamed the STT_FILE symbol with objcopy."""
        return self.output.endswith(".o.tmp")


def compile_command(tree: DebianTree, obj: str) -> CompileCommand:
    """Parse ``<dir>/.<name>.o.cmd`` for ``obj`` (a path relative to ``xen/``)."""
    rel = Path(obj)
    cmd_file = tree.xen_dir / rel.parent / f".{rel.name}.cmd"
    try:
        first = cmd_file.read_text().splitlines()[0]
    except (OSError, IndexError) as exc:
        raise TreeError(f"{obj}: cannot read {cmd_file}: {exc}") from exc
    match = _CMD_LINE_RE.match(first)
    if match is None or match.group(1) != obj:
        raise TreeError(f"{cmd_file}: first line is not 'cmd_{obj} := ...'")
    argv = tuple(shlex.split(match.group(2)))
    if "-c" not in argv or "-o" not in argv:
        raise TreeError(f"{obj}: not a single-source compile ({argv[:2]} ...)")
    source = argv[argv.index("-c") + 1]
    output = argv[argv.index("-o") + 1]
    return CompileCommand(obj=obj, argv=argv, source=source, output=output)


def _replay_argv(cmd: CompileCommand, copy: Path, scratch: Path, tmp_out: Path) -> list[str]:
    """The recorded command with source, outputs and dependency file moved to ``scratch``."""
    argv: list[str] = []
    args = iter(cmd.argv)
    for arg in args:
        if arg == "-MF":
            argv += [arg, str(scratch / "deps.d")]
            next(args)
        elif arg == "-o":
            argv += [arg, str(tmp_out)]
            next(args)
        elif arg == "-c":
            next(args)
            src_dir = str(Path(cmd.source).parent)
            argv += ["-iquote", src_dir, f"-ffile-prefix-map={scratch}/=", "-c", str(copy)]
        else:
            argv.append(arg)
    return argv


def recompile(tree: DebianTree, obj: str, source: Path | str, out: Path) -> Path:
    """Compile ``source`` (text or a file) exactly as the tree compiled ``obj``; write ``out``.

    ``source`` replaces the object's source file; the tree is only read.  ``out`` appears
    atomically (temporary file in its folder, then rename).  Raises :class:`TreeError` with gcc's
    messages if the compile fails.
    """
    cmd = compile_command(tree, obj)
    text = source.read_text() if isinstance(source, Path) else source
    return _compile(tree, cmd, text, cmd.source, out)


def compile_like(tree: DebianTree, like: str, name: str, text: str, out: Path) -> Path:
    """Compile a new C file ``name`` with the flags the tree used for the object ``like``.

    The file is treated as if it sat next to ``like``'s source (same folder for quoted includes,
    STT_FILE renamed to ``<dir>/<name>`` as the build would): for test payloads built with the
    hypervisor's real compiler options.
    """
    cmd = compile_command(tree, like)
    rel_source = str(Path(cmd.source).parent / name)
    return _compile(tree, cmd, text, rel_source, out)


def _compile(tree: DebianTree, cmd: CompileCommand, text: str, rel_source: str,
             out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xsb-recompile-") as tmp:
        scratch = Path(tmp)
        copy = scratch / rel_source
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(text)
        compiled = scratch / "compiled.o"
        _run(_replay_argv(cmd, copy, scratch, compiled), tree, f"compiling {rel_source}")
        final = compiled
        if cmd.needs_redefine:
            final = scratch / "renamed.o"
            name = Path(rel_source).name
            _run(["objcopy", f"--redefine-sym={name}={rel_source}", str(compiled), str(final)],
                 tree, f"objcopy of {rel_source}")
        _install(final, out)
    return out


def _install(src: Path, out: Path) -> None:
    """Copy ``src`` to ``out`` through a temporary file in ``out``'s folder and a rename."""
    fd, partial = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, partial)
        os.replace(partial, out)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _run(argv: list[str], tree: DebianTree, what: str) -> None:
    proc = subprocess.run(argv, cwd=tree.xen_dir, env=tree.build_env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise TreeError(f"{what} failed (rc={proc.returncode}):\n{proc.stderr.strip()}")
