"""Upstream Xen trees built the way teams build them, and the e2e patches ported to them.

``../shared/xen-src/xen-<version>.tar.xz`` holds the hypervisor sources of a release.  A team
builds it with ``make -C xen defconfig``, ``CONFIG_LIVEPATCH=y``, ``make olddefconfig`` and
``make -C xen``, with today's date, its user and host in ``compile.h`` and no path mapping: an
ordinary tree, not a reproducible one.  :func:`upstream_tree` builds each release that way once
per machine (about 90 s on 2 cores), in the XDG cache keyed by the tarball's sha256 as the Debian
tree is, built in a scratch folder and renamed into place when complete.  Nothing of these trees
belongs in the repository.

:func:`port_patch` carries one of ``tests/xen/patches`` (written against Debian's 4.17) to
another release: the patch applied to a copy of the files it touches (``patch`` with fuzz, as a
person porting it would), then written back out as a clean diff against the tree.  A patch whose
change itself does not exist in the release is not ported (None).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from xsbuild.capture import parse_patch_files

from . import SHARED_DIR, cache_root

XEN_SRC = SHARED_DIR / "xen-src"
READY = "xsbuild-upstream.ok"  # written last: a folder without it is rebuilt


class UpstreamTreeError(RuntimeError):
    """The release's tarball is missing, or its build failed."""


@dataclass(frozen=True)
class UpstreamTree:
    version: str
    top: Path  # holds xen/, Config.mk, config/

    @property
    def xen_dir(self) -> Path:
        """Where make ran: every path of a ``.o.cmd`` is relative to it."""
        return self.top / "xen"

    @property
    def build_env(self) -> dict[str, str]:
        """The environment the tree was built in (for :func:`.debian_tree.recompile`)."""
        return {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "CFLAGS")}

    @property
    def xen_syms(self) -> Path:
        return self.top / "xen" / "xen-syms"

    @property
    def xen_gz(self) -> Path:
        return self.top / "xen" / "xen.gz"


def tarball(version: str) -> Path:
    return XEN_SRC / f"xen-{version}.tar.xz"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def upstream_tree(version: str, *, jobs: int = 2) -> UpstreamTree:
    """The built tree of ``version``, building it first if this machine has none."""
    src = tarball(version)
    if not src.is_file():
        raise UpstreamTreeError(f"{src}: no such tarball (../shared/xen-src/)")
    folder = cache_root() / "upstream" / f"{version}-{_sha256(src)[:16]}"
    tree = UpstreamTree(version, folder / f"xen-{version}")
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / READY).is_file():
            _build(src, folder, tree, jobs)
    return tree


def _build(src: Path, folder: Path, tree: UpstreamTree, jobs: int) -> None:
    shutil.rmtree(tree.top, ignore_errors=True)
    scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".build-"))
    log = folder / "build.log"
    log.write_text("")
    try:
        subprocess.run(["tar", "xf", str(src), "-C", str(scratch)], check=True)
        top = scratch / tree.top.name
        _make(tree, top, log, "defconfig")
        with (top / "xen" / ".config").open("a") as config:
            config.write("CONFIG_LIVEPATCH=y\n")
        _make(tree, top, log, "olddefconfig")
        # Built where it will live: its debug info names that path, as a team's tree does.
        os.rename(top, tree.top)
        _make(tree, tree.top, log, f"-j{jobs}")
        (folder / READY).write_text(f"{tree.version}\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _make(tree: UpstreamTree, top: Path, log: Path, *args: str) -> None:
    with log.open("a") as out:
        run = subprocess.run(["make", "-C", "xen", *args], cwd=top, env=tree.build_env,
                             stdout=out, stderr=subprocess.STDOUT, check=False)
    if run.returncode != 0:
        raise UpstreamTreeError(f"make {' '.join(args)} in {top} failed: see {log}")


def port_patch(patch: Path, top: Path, out: Path) -> Path | None:
    """``patch`` carried to the tree ``top`` as a clean diff written to ``out``, or None."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = [f.path for f in parse_patch_files(patch.read_text(), patch.name)
                 if not f.deleted]
        for side in ("a", "b"):
            for rel in files:
                original = top / rel
                if original.is_file():
                    (work / side / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(original, work / side / rel)
        run = subprocess.run(["patch", "-p1", "-F2", "--batch", "--no-backup-if-mismatch",
                              "-s", "-i", str(patch.resolve())], cwd=work / "b",
                             capture_output=True, text=True, check=False)
        if run.returncode != 0:
            return None
        diff = subprocess.run(["diff", "-Nru", "a", "b"], cwd=work, capture_output=True,
                              text=True, check=False)
        if diff.returncode != 1:  # 1: they differ; 0 would mean the patch changed nothing
            return None
        header = patch.read_text().split("\n--- ", 1)[0]
        out.write_text(f"{header}\n{diff.stdout}")
    return out


# --------------------------------------------------------------------------- Debian trixie
TRIXIE_XEN = "4.20.4+63-g7abfd2bce2-0+deb13u1"
TRIXIE_SOURCES = "deb http://deb.debian.org/debian trixie main\n"


def trixie_xen_syms(version: str = TRIXIE_XEN) -> Path:
    """trixie's shipped ``xen-syms`` (``xen-hypervisor-4.20-amd64-dbg``), downloaded once with a
    private apt configuration (the machine's sources are not touched), cached."""
    folder = cache_root() / "trixie" / version
    syms = folder / "root" / "usr" / "lib" / "debug" / "boot" / "xen-syms-4.20-amd64"
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if syms.is_file():
            return syms
        apt = folder / "apt"
        (apt / "parts").mkdir(parents=True, exist_ok=True)
        (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (apt / "parts" / "trixie.list").write_text(TRIXIE_SOURCES)
        opts = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={apt}/parts",
                "-o", f"Dir::State::Lists={apt}/lists", "-o", "Dir::Cache::pkgcache=",
                "-o", "Dir::Cache::srcpkgcache="]
        debs = folder / "debs"
        debs.mkdir(exist_ok=True)
        for args, cwd in ((["update", "-qq"], folder),
                          (["download", "-q", f"xen-hypervisor-4.20-amd64-dbg={version}"], debs)):
            run = subprocess.run(["apt-get", *opts, *args], cwd=cwd, capture_output=True,
                                 text=True, check=False)
            if run.returncode != 0:
                raise UpstreamTreeError(f"apt-get {args[0]} (trixie): {run.stderr.strip()[-300:]}")
        scratch = Path(tempfile.mkdtemp(dir=folder, prefix=".root-"))
        try:
            for deb in debs.glob("*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(scratch)], check=True)
            shutil.rmtree(folder / "root", ignore_errors=True)
            os.rename(scratch, folder / "root")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if not syms.is_file():
            raise UpstreamTreeError(f"{syms}: not in trixie's -dbg package")
    return syms
