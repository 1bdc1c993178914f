"""Base trees: build an unbuilt tree once (Debian's way when it is a Debian tree), and fetch and
rebuild Debian's hypervisor bit-identically for ``xsbuild build --debian VERSION``.

Both results live in the XDG cache (``$XDG_CACHE_HOME/xsbuild``), are built in a temporary
directory and renamed into place only once complete, and are reused by every later payload build:
one full build per base, ever.

Debian's recipe (debian/rules of xen 4.17, summarised in ``shared/harness/build-xen.sh``):
``SOURCE_DATE_EPOCH`` from the changelog, ``XEN_BUILD_DATE``/``XEN_BUILD_TIME`` from it,
``DEB_VERSION`` and ``DEB_MAINTAINER`` (Debian's patch 0003 puts them in ``compile.h``),
``cp debian/xen-kconfig xen/.config; make olddefconfig``, then ``make -C xen`` with
``CC=x86_64-linux-gnu-gcc LD=x86_64-linux-gnu-ld XEN_COMPILE_ARCH=x86_64 XEN_TARGET_ARCH=x86_64
V=1 EXTRA_CFLAGS_XEN_CORE='-ffile-prefix-map=$PWD=. -fdebug-prefix-map=$PWD=.'``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xsbuild.errors import InputMismatchError, UsageError

Progress = Callable[[str], None]
STAMP = "xsbuild-base.ok"  # written last: a base without it is incomplete and rebuilt
_VERSION_RE = re.compile(r"^[0-9][A-Za-z0-9.+~:-]*$")
# Environment variables debian/rules clears before building (they would change the flags).
_CLEARED_ENV = ("CFLAGS", "CXXFLAGS", "FFLAGS", "CPPFLAGS", "LDFLAGS", "MAKEFLAGS", "MFLAGS",
                "MAKELEVEL")


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/xsbuild`` (``~/.cache/xsbuild`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "xsbuild"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise builds of one cache entry between processes (two CI jobs, two users)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------
# Building a tree


@dataclass(frozen=True, slots=True)
class MakeRecipe:
    """The environment and make variables a tree is built with."""

    env: dict[str, str]
    args: tuple[str, ...]
    debian: bool


def make_recipe(top: Path, *, built_at: Path | None = None) -> MakeRecipe:
    """How to (re)build ``top`` as it was built.

    A Debian tree gets Debian's variables.  Another tree that was built already gets the
    identity its ``compile.h`` records (date, time, user, domain, host: make would otherwise
    put today's into ``common/version.o``); an unbuilt one gets pinned dates.  ``built_at``
    is where the tree was built when ``top`` is a copy of it: its debug info then names the
    original's paths (a Debian tree maps every path to ``.`` anyway).
    """
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED_ENV}
    env.update(LC_ALL="C.UTF-8", TZ="UTC", WGET="/bin/false", GIT="/bin/false")
    debian = (top / "debian" / "changelog").is_file()
    identity = None if debian else compile_identity(top)
    if identity is not None:
        env.update(identity)
    else:
        if debian:
            epoch = _changelog_field(top, "Timestamp")
            env["SOURCE_DATE_EPOCH"] = epoch
            env["DEB_VERSION"] = _changelog_field(top, "Version")
            env["DEB_MAINTAINER"] = _debian_maintainer(top)
        else:
            epoch = env.get("SOURCE_DATE_EPOCH") or "0"
        env["XEN_BUILD_DATE"] = time.strftime("%a %b %e %H:%M:%S UTC %Y", time.gmtime(int(epoch)))
        env["XEN_BUILD_TIME"] = time.strftime("%H:%M:%S", time.gmtime(int(epoch)))
    args: tuple[str, ...] = ()
    if debian:
        args = ("CC=x86_64-linux-gnu-gcc", "LD=x86_64-linux-gnu-ld", "XEN_COMPILE_ARCH=x86_64",
                "XEN_TARGET_ARCH=x86_64", "V=1",
                f"EXTRA_CFLAGS_XEN_CORE=-ffile-prefix-map={top}=. -fdebug-prefix-map={top}=.")
    elif built_at is not None and built_at.resolve() != top.resolve():
        args = (f"EXTRA_CFLAGS_XEN_CORE=-fdebug-prefix-map={top.resolve()}={built_at.resolve()}",)
    return MakeRecipe(env, args, debian)


# compile.h's fields (xen/include/xen/compile.h.in) and the make variables that fill them
# (xen/build.mk: cmd_compile.h), the same in 4.17 to 4.21.
_COMPILE_H_FIELDS = {"XEN_COMPILE_DATE": "XEN_BUILD_DATE", "XEN_COMPILE_TIME": "XEN_BUILD_TIME",
                     "XEN_COMPILE_BY": "XEN_WHOAMI", "XEN_COMPILE_DOMAIN": "XEN_DOMAIN",
                     "XEN_COMPILE_HOST": "XEN_BUILD_HOST"}
_COMPILE_H_LINE = re.compile(r'^#define\s+(XEN_COMPILE_[A-Z]+)\s+"(.*)"\s*$', re.MULTILINE)


def compile_identity(top: Path) -> dict[str, str] | None:
    """The make variables that regenerate a built tree's ``compile.h`` unchanged, or None
    when the tree has no (complete) ``compile.h``."""
    try:
        text = (top / "xen" / "include" / "xen" / "compile.h").read_text(errors="replace")
    except OSError:
        return None
    found = {m.group(1): m.group(2) for m in _COMPILE_H_LINE.finditer(text)}
    if not all(field in found for field in _COMPILE_H_FIELDS):
        return None
    return {var: found[field] for field, var in _COMPILE_H_FIELDS.items()}


def _changelog_field(top: Path, name: str) -> str:
    run = subprocess.run(["dpkg-parsechangelog", f"-S{name}"], cwd=top, capture_output=True,
                         text=True, check=False)
    if run.returncode != 0 or not run.stdout.strip():
        raise UsageError(f"{top}/debian/changelog: dpkg-parsechangelog -S{name} failed "
                         "(is dpkg-dev installed?)")
    return run.stdout.strip()


def _debian_maintainer(top: Path) -> str:
    for line in (top / "debian" / "control").read_text(errors="replace").splitlines():
        if line.startswith("Maintainer:"):
            return line.split(":", 1)[1].strip()
    raise UsageError(f"{top}/debian/control has no Maintainer field")


def build_tree(top: Path, *, jobs: int, progress: Progress, log: Path,
               shipped_config: Path | None = None) -> None:
    """Build the hypervisor of ``top`` in place (``top`` must be xsbuild's own copy).

    The tree's own ``xen/.config`` is used when present; a Debian tree without one gets
    ``debian/xen-kconfig`` (or the shipped config, when given and different after
    ``olddefconfig``, as the harness does).
    """
    recipe = make_recipe(top)
    config = top / "xen" / ".config"
    if not config.is_file():
        kconfig = top / "debian" / "xen-kconfig"
        if not kconfig.is_file():
            raise UsageError(f"{top}/xen has no .config (and no debian/xen-kconfig): configure "
                             "it first, e.g. make -C xen defconfig, or copy the running "
                             "hypervisor's config")
        shutil.copyfile(kconfig, config)
        _make(top, recipe, ["olddefconfig"], log)
        if shipped_config and shipped_config.read_bytes() != config.read_bytes():
            shutil.copyfile(shipped_config, config)
            _make(top, recipe, ["olddefconfig"], log)
    progress(f"building the base hypervisor once in {top} (-j{jobs}); later builds reuse it")
    start = time.monotonic()
    _make(top, recipe, [f"-j{max(1, jobs)}"], log)
    progress(f"base built in {time.monotonic() - start:.0f} s")


def _make(top: Path, recipe: MakeRecipe, targets: list[str], log: Path) -> None:
    with log.open("a") as out:
        run = subprocess.run(["make", "-C", "xen", *recipe.args, *targets], cwd=top,
                             env=recipe.env, stdout=out, stderr=subprocess.STDOUT, check=False)
    if run.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise UsageError(f"building the base tree failed (make {' '.join(targets)}, "
                         f"log {log}):\n{tail}")


def _tree_key(top: Path) -> str:
    """A content hash of what the hypervisor build reads: ``xen/``'s sources, the top-level
    make configuration and Debian's packaging metadata.  Build outputs are skipped so a
    half-built tree and a clean one of the same sources share the key."""
    h = hashlib.sha256()
    skip_suffixes = (".o", ".a", ".cmd", ".d", ".tmp", ".map", ".gz", ".efi")
    roots = [top / "xen", top / "config", top / "Config.mk", top / "debian"]
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            if path.name.endswith(skip_suffixes) or path.name in ("xen-syms", "xen"):
                continue
            h.update(str(path.relative_to(top)).encode() + b"\0")
            h.update(path.read_bytes())
    return h.hexdigest()[:24]


def cached_base_build(top: Path, *, jobs: int, progress: Progress) -> Path:
    """A built copy of the unbuilt tree ``top`` in the cache (built now if not there yet)."""
    progress(f"{top} is not built; hashing it to find or make its cached build")
    key = _tree_key(top)
    bases = cache_root() / "bases"
    final = bases / key
    with _locked(bases):
        if (final / STAMP).is_file():
            return final
        shutil.rmtree(final, ignore_errors=True)
        tmp = bases / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(top, tmp, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        try:
            # The tree records its own absolute path in the compile lines (prefix maps), so it
            # is built where it will stay: build in tmp, then rename, would break the
            # self-check's path rewriting for nothing; build at the final path instead.
            tmp.rename(final)
            build_tree(final, jobs=jobs, progress=progress, log=final / "xsbuild-base-build.log")
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)
            raise
        (final / STAMP).write_text(str(top) + "\n")
    return final


# ------------------------------------------------------------------------------------------
# --debian VERSION


@dataclass(frozen=True, slots=True)
class DebianBase:
    """Debian's source tree for one version, built, and its shipped ``xen-syms``."""

    version: str
    top: Path
    xen_syms: Path


def hypervisor_package(version: str) -> str:
    """``xen-hypervisor-4.17-amd64`` for version ``4.17.5+72-g01140da4e8-1``."""
    m = re.match(r"^(?:\d+:)?(\d+)\.(\d+)", version)
    if not m:
        raise UsageError(f"bad Debian version {version!r}: expected e.g. 4.17.5+72-g01140da4e8-1")
    return f"xen-hypervisor-{m.group(1)}.{m.group(2)}-amd64"


def version_folder(version: str) -> Path:
    """Where Debian's ``version`` lives in the cache: ``ref/`` (the shipped packages, with the
    ``-dbg`` xen-syms) and ``xen-<upstream version>/`` (the source tree, built): the layout of a
    ``shared/harness/build-xen.sh`` WORKDIR."""
    return cache_root() / "debian" / version


def debian_base(version: str, *, jobs: int, progress: Progress) -> DebianBase:
    """Fetch (once) Debian's xen source and ``-dbg`` hypervisor for ``version``, rebuild it
    (once) and insist the build-id equals the shipped one."""
    if not _VERSION_RE.match(version):
        raise UsageError(f"bad Debian version {version!r}")
    folder = version_folder(version)
    if _source_tree(folder) is None:
        # Before the cache entry exists: a version apt cannot fetch leaves nothing behind.
        _check_source_available(version)
    with _locked(folder):
        ref = folder / "ref"
        top = _source_tree(folder)
        if not (ref / ".complete").is_file():
            _download_binaries(version, ref, progress)
        if top is None:
            top = _download_source(version, folder, progress)
        xen_syms = _shipped_xen_syms(ref)
        if not (top / STAMP).is_file():
            _build_debian(top, ref, jobs, progress, xen_syms)
    return DebianBase(version, top, xen_syms)


def _run_apt(args: list[str], cwd: Path, what: str) -> None:
    run = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if run.returncode == 0:
        return
    text = (run.stderr or run.stdout).strip()
    if "deb-src" in text or "source URIs" in text:
        raise UsageError(f"{what}: apt has no deb-src entry; add 'Types: deb deb-src' to "
                         "/etc/apt/sources.list.d/debian.sources (or a deb-src line) and run "
                         "apt-get update")
    last = text.splitlines()[-1] if text else f"exit status {run.returncode}"
    raise UsageError(f"{what} failed: {' '.join(args)}: {last}")


def _check_source_available(version: str) -> None:
    """Refuse at once, in one line, a version whose source package apt cannot fetch (a trixie
    version on a bookworm machine, say): nothing can be rebuilt without it.  (``--print-uris``
    downloads and writes nothing.)"""
    run = subprocess.run(["apt-get", "source", "--print-uris", "-q", f"xen={version}"],
                         capture_output=True, text=True, check=False)
    text = (run.stderr or "").strip()
    if run.returncode == 0 or "deb-src" in text or "source URIs" in text:
        return  # available, or no deb-src at all: _download_source names that fix
    raise UsageError(f"Debian's xen {version} source package cannot be fetched with this "
                     "machine's apt sources (apt-get source: "
                     f"{text.splitlines()[0] if text else f'exit {run.returncode}'}); "
                     "--debian rebuilds the hypervisor from it. Next: build from a tree you "
                     "built (--srcdir) or a base archive (--base)")


def _download_binaries(version: str, ref: Path, progress: Progress) -> None:
    pkg = hypervisor_package(version)
    shutil.rmtree(ref, ignore_errors=True)
    ref.mkdir(parents=True)
    progress(f"downloading {pkg} and {pkg}-dbg {version}")
    _run_apt(["apt-get", "download", "-q", f"{pkg}={version}", f"{pkg}-dbg={version}"], ref,
             "downloading Debian's hypervisor packages")
    for deb in sorted(ref.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(ref)], check=True)
    (ref / ".complete").write_text(version + "\n")


def _shipped_xen_syms(ref: Path) -> Path:
    found = sorted((ref / "usr" / "lib" / "debug" / "boot").glob("xen-syms-*"))
    if not found:
        raise UsageError(f"{ref}: the -dbg package holds no usr/lib/debug/boot/xen-syms-*")
    return found[0]


def _source_tree(folder: Path) -> Path | None:
    for cand in sorted(folder.glob("xen-*")):
        if (cand / "debian" / "changelog").is_file() and (cand / "xen" / "Rules.mk").is_file():
            return cand
    return None


def _download_source(version: str, folder: Path, progress: Progress) -> Path:
    progress(f"downloading and unpacking Debian's xen {version} source package")
    src = folder / "src.tmp"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    _run_apt(["apt-get", "source", "-q", f"xen={version}"], src,
             "downloading Debian's xen source package")
    tree = _source_tree(src)
    if tree is None:
        raise UsageError(f"apt-get source xen={version} produced no xen-*/ tree in {src}")
    final = folder / tree.name
    tree.rename(final)
    shutil.rmtree(src, ignore_errors=True)
    return final


def _build_debian(top: Path, ref: Path, jobs: int, progress: Progress, xen_syms: Path) -> None:
    from xsbuild.xensyms import read_build_id

    shipped = sorted((ref / "boot").glob("xen-*.config"))
    build_tree(top, jobs=jobs, progress=progress, log=top / "xsbuild-base-build.log",
               shipped_config=shipped[0] if shipped else None)
    ours, theirs = read_build_id(top / "xen" / "xen-syms"), read_build_id(xen_syms)
    if ours != theirs:
        raise InputMismatchError(
            f"the rebuilt hypervisor's build-id {ours.hex()} differs from Debian's "
            f"{theirs.hex()} ({xen_syms}): the build is not bit-identical (compiler or binutils "
            "differ from Debian's: gcc 12.2.0-14+deb12u1, binutils 2.40-2?), so a payload "
            f"built from it would not fit the shipped hypervisor. Log: "
            f"{top / 'xsbuild-base-build.log'}")
    (top / STAMP).write_text(ours.hex() + "\n")
