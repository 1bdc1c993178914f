#!/usr/bin/env python3
"""One base shared by N payload builds versus N independent builds, and the base archive's cost.

Candidate ("shared"): the base is built once and exported (``xsbuild base export``), then N
payload builds run ``xsbuild build --base ARCHIVE``, each in a fresh cache as N CI jobs on N
runners would: each imports the archive (verified) and builds its payload.
Baseline ("independent"): N builds of the same N patches with ``xsbuild build --srcdir UNBUILT``,
each in a fresh cache, so each builds the base itself first (what N CI jobs without a shared base
pay).  Both run in the same process, one after the other, serially (``-j`` per build).

The tree is the small gcc-built fake tree of ``tests/test_build.py`` (a full build of Debian's
Xen costs minutes per job, so 16 independent ones are out of reach on the 2-core machine); the
archive's size, export and import time are also measured on Debian's built tree when it exists
(``--debian-tree``, default the cache's).

    python3 bench/fleet_base.py [--ns 1,4,16] [-j 2] [--debian-tree TOP | --no-debian]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_build import make, make_patch, replace_in, write_tree  # noqa: E402

DEBIAN_TOP = (Path.home() / ".cache/xsbuild/debian/4.17.5+72-g01140da4e8-1"
              / "xen-4.17.5+72-g01140da4e8")


def run(argv: list[str], env: dict[str, str] | None = None) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}... failed:\n{proc.stderr[-2000:]}")
    return time.monotonic() - start


def xsbuild(*args: str, env: dict[str, str] | None = None) -> float:
    return run([sys.executable, "-m", "xsbuild", *args], env)


def patches(top: Path, out: Path, n: int) -> list[Path]:
    """N different one-line fixes (gamma_fn's constant), as N advisories."""
    out.mkdir()
    return [make_patch(top, {"xen/common/gamma.c": replace_in(
        top, "xen/common/gamma.c", "0x5a", hex(0x5b + i))}, out / f"fix-{i}.patch")
        for i in range(n)]


def shared(work: Path, unbuilt: Path, ps: list[Path], ref_syms: Path, jobs: int) -> float:
    start = time.monotonic()
    base = work / "base"
    shutil.copytree(unbuilt, base, symlinks=True)
    make(base)
    archive = work / "base.tar.gz"
    xsbuild("base", "export", "--srcdir", str(base), "-o", str(archive), "-q")
    for i, p in enumerate(ps):
        env = {"XDG_CACHE_HOME": str(work / f"cache-s{i}")}
        xsbuild("build", "--base", str(archive), "--patch", str(p), "-o",
                str(work / f"s{i}.livepatch"), "-j", str(jobs), "-q", env=env)
    return time.monotonic() - start


def independent(work: Path, unbuilt: Path, ps: list[Path], ref_syms: Path, jobs: int) -> float:
    start = time.monotonic()
    for i, p in enumerate(ps):
        env = {"XDG_CACHE_HOME": str(work / f"cache-i{i}")}
        xsbuild("build", "--srcdir", str(unbuilt), "--patch", str(p), "--xen-syms",
                str(ref_syms), "-o", str(work / f"i{i}.livepatch"), "-j", str(jobs), "-q",
                env=env)
    return time.monotonic() - start


def fake_table(ns: list[int], jobs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="xsb-bench-fleet-") as tmp:
        root = Path(tmp)
        unbuilt = root / "unbuilt"
        write_tree(unbuilt)
        ref = root / "ref"
        shutil.copytree(unbuilt, ref)
        make(ref)
        ref_syms = ref / "xen/xen-syms"
        print("| N | shared base (1 base build + N builds from the archive) | N independent "
              "builds | independent / shared |")
        print("|---|---|---|---|")
        for n in ns:
            work = root / f"n{n}"
            work.mkdir()
            ps = patches(unbuilt, work / "patches", n)
            (work / "s").mkdir()
            (work / "i").mkdir()
            s = shared(work / "s", unbuilt, ps, ref_syms, jobs)
            i = independent(work / "i", unbuilt, ps, ref_syms, jobs)
            same = all((work / f"s/s{k}.livepatch").read_bytes()
                       == (work / f"i/i{k}.livepatch").read_bytes() for k in range(n))
            print(f"| {n} | {s:.1f} s | {i:.1f} s | {i / s:.2f}x"
                  f"{'' if same else ' (PAYLOADS DIFFER)'} |", flush=True)


def archive_table(top: Path, label: str) -> None:
    with tempfile.TemporaryDirectory(prefix="xsb-bench-archive-") as tmp:
        root = Path(tmp)
        archive = root / "base.tar.gz"
        t_export = xsbuild("base", "export", "--srcdir", str(top), "-o", str(archive), "-q")
        tree_bytes = sum(p.lstat().st_size for p in top.rglob("*") if p.is_file()
                         and not p.is_symlink())
        t_import = xsbuild("base", "import", "-q", str(archive),
                           env={"XDG_CACHE_HOME": str(root / "cache")})
        t_reuse = xsbuild("base", "import", "-q", str(archive),
                          env={"XDG_CACHE_HOME": str(root / "cache")})
        size = archive.stat().st_size
        print(f"| {label} | {_size(tree_bytes)} | {_size(size)} "
              f"({size / tree_bytes:.0%}) | {t_export:.1f} s | {t_import:.1f} s | "
              f"{t_reuse:.2f} s |", flush=True)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ns", default="1,4,16")
    ap.add_argument("-j", "--jobs", type=int, default=2)
    ap.add_argument("--debian-tree", type=Path, default=DEBIAN_TOP)
    ap.add_argument("--no-debian", action="store_true")
    args = ap.parse_args()
    fake_table([int(x) for x in args.ns.split(",")], args.jobs)
    print()
    print("| tree | files | archive | export | import (unpack + verify) | import again "
          "(cache hit) |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        fake = Path(tmp) / "fake"
        write_tree(fake)
        make(fake)
        archive_table(fake, "fake tree")
    if not args.no_debian and (args.debian_tree / "xen/xen-syms").is_file():
        archive_table(args.debian_tree, "Debian xen 4.17 (built)")


if __name__ == "__main__":
    main()
