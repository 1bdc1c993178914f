"""A CPython 3.11 for dom0, with this project installed, so ``python3 -m xsbuild`` runs there.

The harness's dom0 is a busybox initramfs without Python.  As target-notes.md describes, Debian's
own Python packages unpacked into one folder work there once ``PYTHONHOME`` and
``LD_LIBRARY_PATH`` point into it.  Three folders are passed into dom0 with ``boot(files=...)``:

* ``/opt/py``: Debian's python3.11 and the libraries it needs (``dpkg-deb -x`` of the .debs);
* ``/opt/pydeps``: the project's runtime dependencies, ``pip install --target`` for CPython 3.11
  on manylinux x86-64 (whatever Python runs the tests);
* ``/opt/xsbuild``: this checkout, built as a wheel and installed with ``pip --target``.

A test that needs more in dom0 asks :func:`get_dom0_python` for it, and gets two more folders:

* ``/opt/pyextra``: ``extra`` requirements (ansible-core, say) with their dependencies, installed
  like the project's dependencies but into a folder of their own, after them on ``PYTHONPATH``;
* ``/opt/locale``: glibc's ``C.UTF-8`` locale from Debian's ``libc-bin`` (``utf8_locale``), with
  ``LOCPATH`` and ``LANG`` pointing at it.  The busybox dom0 has no locale at all, so Python runs
  in the C locale there; a program that insists on a UTF-8 locale (ansible) needs this one, as it
  would find it in a real Debian dom0.

Each folder is cached under ``<cache>/dom0py`` under a key computed from what went into it (the
.deb file names, the dependency list, a hash of the project's files), so only a change rebuilds
it; the project folder rebuilds in a few seconds.  All three are byte-compiled on the host with
the paths they have in dom0, because compiling the standard library under TCG emulation costs
seconds on every boot.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import REPO_ROOT, cache_root

DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libexpat1",
    "libffi8", "libssl3", "libbz2-1.0", "libncursesw6", "libtinfo6", "libreadline8",
    "libsqlite3-0", "liblzma5", "zlib1g", "libstdc++6", "libgcc-s1",
)
DOM0_PYTHON_VERSION = "3.11"
# pip selects wheels for dom0's interpreter, not for the one running the tests.
PIP_PLATFORM_ARGS = (
    "--python-version", DOM0_PYTHON_VERSION, "--implementation", "cp", "--only-binary=:all:",
    "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
)
# Only its C.UTF-8 locale is used (utf8_locale); libc-bin's version matches the dom0's libc6.
LOCALE_PACKAGE = "libc-bin"
LOCALE_PATH = "usr/lib/locale/C.utf8"
# Paths inside dom0.
PY_DIR = "/opt/py"
DEPS_DIR = "/opt/pydeps"
PROJECT_DIR = "/opt/xsbuild"
EXTRA_DIR = "/opt/pyextra"
LOCALE_DIR = "/opt/locale"
# What a project wheel is built from (everything else in the checkout is irrelevant to it).
PROJECT_FILES = ("pyproject.toml", "setup.cfg", "setup.py", "MANIFEST.in", "README.md")
PROJECT_PACKAGE = "xsbuild"
KEEP_PROJECT_BUILDS = 3

DOM0_ENV = f"""\
# Python for dom0 (tests/xen/dom0py.py)
export PYTHONHOME={PY_DIR}/usr
export LD_LIBRARY_PATH=${{LD_LIBRARY_PATH}}:{PY_DIR}/usr/lib/x86_64-linux-gnu:\
{PY_DIR}/lib/x86_64-linux-gnu
export PYTHONPATH={PROJECT_DIR}:{DEPS_DIR}
export PYTHONDONTWRITEBYTECODE=1
export PATH={PY_DIR}/usr/bin:$PATH
xsbuild() {{ python3 -m xsbuild "$@"; }}
"""
EXTRA_ENV = f"export PYTHONPATH=$PYTHONPATH:{EXTRA_DIR}\n"
LOCALE_ENV = f"export LOCPATH={LOCALE_DIR} LANG=C.UTF-8\n"


class BundleError(RuntimeError):
    """A step of building the dom0 Python bundle failed (download, pip, wheel build)."""


@dataclass(frozen=True)
class Dom0Python:
    """The cached folders and how to use them in a boot."""

    debian_root: Path
    deps: Path
    project: Path
    extra: Path | None = None  # the extra requirements, if any were asked for
    locale: Path | None = None  # the C.UTF-8 locale, if asked for

    def files(self) -> dict[Path, str]:
        """The ``files`` argument of :func:`tests.xen.qemu.boot`."""
        files = {self.debian_root: PY_DIR, self.deps: DEPS_DIR, self.project: PROJECT_DIR}
        if self.extra is not None:
            files[self.extra] = EXTRA_DIR
        if self.locale is not None:
            files[self.locale] = LOCALE_DIR
        return files

    @property
    def env(self) -> str:
        """Shell lines for the top of a command file (``Script(preamble=...)``)."""
        return (DOM0_ENV + (EXTRA_ENV if self.extra is not None else "")
                + (LOCALE_ENV if self.locale is not None else ""))


# --------------------------------------------------------------------------- helpers
def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BundleError(f"{what} failed (rc={proc.returncode}): {' '.join(argv)}\n"
                          f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return proc.stdout


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:16]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _cached(target: Path, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build(tmp)`` into a sibling and renamed only when complete."""
    if target.is_dir():
        return target
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        build(tmp)
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _compile(folder: Path, dom0_path: str) -> None:
    """Byte-compile ``folder`` with the tests' CPython 3.11, naming files as dom0 sees them."""
    if sys.version_info[:2] != (3, 11):
        return  # another CPython writes .pyc files 3.11 cannot use: dom0 compiles on import
    _run([sys.executable, "-m", "compileall", "-q", "-j0", "-d", dom0_path, str(folder)],
         f"compileall {folder}")


# --------------------------------------------------------------------------- Debian part
def _download_debs(debs: Path, packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[Path]:
    """The packages' .debs in ``debs``, downloading those not there yet (apt's candidates)."""
    debs.mkdir(parents=True, exist_ok=True)
    debs.chmod(0o777)  # apt's _apt user writes there when run as root
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        _run(["apt-get", "download", "-q", *missing], "apt-get download", cwd=debs)
    found = [next(iter(sorted(debs.glob(f"{p}_*.deb")))) for p in packages]
    return found


def _unpack_debian(debs: list[Path], dest: Path) -> None:
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(dest)], f"dpkg-deb -x {deb.name}")
    for unused in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian"):
        shutil.rmtree(dest / unused, ignore_errors=True)
    python3 = dest / "usr/bin/python3"
    if not python3.exists():  # python3-minimal (the symlink package) is not needed otherwise
        python3.symlink_to(f"python{DOM0_PYTHON_VERSION}")
    stdlib = dest / f"usr/lib/python{DOM0_PYTHON_VERSION}"
    _compile(stdlib, f"{PY_DIR}/usr/lib/python{DOM0_PYTHON_VERSION}")


def debian_python(base: Path) -> Path:
    debs = _download_debs(base / "debs")
    key = _digest([d.name.encode() for d in debs])
    return _cached(base / f"debian-{key}", lambda tmp: _unpack_debian(debs, tmp))


def _unpack_locale(deb: Path, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="xsb-locale-") as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp], f"dpkg-deb -x {deb.name}")
        source = Path(tmp) / LOCALE_PATH
        if not source.is_dir():
            raise BundleError(f"{deb.name} has no {LOCALE_PATH}")
        shutil.copytree(source, dest / source.name, symlinks=True)


def utf8_locale(base: Path) -> Path:
    """A folder holding ``C.utf8``, for ``LOCPATH``."""
    (deb,) = _download_debs(base / "debs", (LOCALE_PACKAGE,))
    key = _digest([deb.name.encode()])
    return _cached(base / f"locale-{key}", lambda tmp: _unpack_locale(deb, tmp))


# --------------------------------------------------------------------------- pip parts
def _runtime_dependencies() -> list[str]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as handle:
        project = tomllib.load(handle)["project"]
    return list(project.get("dependencies", []))


def _pip_target(dest: Path, requirements: list[str], dom0_path: str) -> None:
    _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "--no-compile", "--target", str(dest), *PIP_PLATFORM_ARGS, *requirements],
         "pip install --target")
    _compile(dest, dom0_path)


def _pip_folder(base: Path, prefix: str, reqs: list[str], dom0_path: str) -> Path:
    """``reqs`` installed for dom0, cached under a key made of them and the platform."""
    key = _digest([r.encode() for r in sorted(reqs)] + [" ".join(PIP_PLATFORM_ARGS).encode()])
    return _cached(base / f"{prefix}-{key}", lambda tmp: _pip_target(tmp, reqs, dom0_path))


def dependencies(base: Path) -> Path:
    return _pip_folder(base, "deps", _runtime_dependencies(), DEPS_DIR)


def extra_packages(base: Path, requirements: Sequence[str]) -> Path:
    """``requirements`` and their dependencies, self-contained (whatever the project's
    dependencies folder holds), for ``/opt/pyextra``."""
    return _pip_folder(base, "extra", list(requirements), EXTRA_DIR)


def _project_sources() -> list[Path]:
    files = [REPO_ROOT / f for f in PROJECT_FILES if (REPO_ROOT / f).is_file()]
    package = REPO_ROOT / PROJECT_PACKAGE
    files += sorted(p for p in package.rglob("*")
                    if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    return files


def _project_key() -> str:
    parts: list[bytes] = []
    for path in _project_sources():
        parts += [str(path.relative_to(REPO_ROOT)).encode(), path.read_bytes()]
    return _digest(parts)


def _build_project(dest: Path) -> None:
    """Wheel from a copy of the checkout (a build in place would leave build/ in the repo)."""
    with tempfile.TemporaryDirectory(prefix="xsb-wheel-") as tmp:
        src = Path(tmp) / "src"
        for path in _project_sources():
            target = src / path.relative_to(REPO_ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
        dist = Path(tmp) / "dist"
        _run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
              "--no-deps", "-w", str(dist), str(src)], "building the xsbuild wheel")
        wheels = list(dist.glob("*.whl"))
        if len(wheels) != 1:
            raise BundleError(f"expected one wheel, got {wheels}")
        _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "--no-deps", "--no-compile", "--target", str(dest), str(wheels[0])],
             "pip install of the xsbuild wheel")
    _compile(dest, PROJECT_DIR)


def _prune_projects(base: Path, keep: Path) -> None:
    builds = sorted(base.glob("project-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in builds[KEEP_PROJECT_BUILDS:]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def project(base: Path) -> Path:
    target = _cached(base / f"project-{_project_key()}", _build_project)
    target.touch()  # most recently used, for pruning
    _prune_projects(base, target)
    return target


# --------------------------------------------------------------------------- entry point
def get_dom0_python(extra: Sequence[str] = (), utf8: bool = False) -> Dom0Python:
    """Build (or reuse) the bundle; serialised per machine with a lock in the cache folder.

    ``extra``: more requirements for dom0 (``/opt/pyextra``); ``utf8``: the C.UTF-8 locale.
    """
    base = cache_root() / "dom0py"
    with _locked(base):
        return Dom0Python(debian_root=debian_python(base), deps=dependencies(base),
                          project=project(base),
                          extra=extra_packages(base, extra) if extra else None,
                          locale=utf8_locale(base) if utf8 else None)
