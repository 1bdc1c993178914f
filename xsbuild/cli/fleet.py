"""``xsbuild base export/import``, ``xsbuild matrix``, ``xsbuild index``: plugging into CI and
rollout engines (which do the scheduling and the distribution; xsbuild only describes the work)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from xsbuild.cli import cli
from xsbuild.cli.common import check_output
from xsbuild.errors import UsageError


def _progress(line: str) -> None:
    click.echo(f"xsbuild: {line}", err=True)


def _silent(_line: str) -> None:
    pass


@cli.group("base")
def base_group() -> None:
    """Built base trees as reproducible archives (a CI cache or artifact store keeps them).

    \b
    Examples:
      xsbuild base export --debian 4.17.5+72-g01140da4e8-1 -o bases/
      xsbuild base import bases/xsbuild-base-39a6...e920.tar.gz
      xsbuild build --base bases/xsbuild-base-39a6...e920.tar.gz --patch fix.patch -o fix.livepatch
    """


@base_group.command("export")
@click.option("--srcdir", type=click.Path(file_okay=False, path_type=Path),
              help="Xen source tree (built, or built once into the cache now).")
@click.option("--debian", "debian_version", metavar="VERSION",
              help="Debian's xen VERSION (fetched and rebuilt bit-identically once).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Archive to write, or an existing folder to write "
                   "xsbuild-base-<build-id>.tar.gz into.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=os.cpu_count() or 1,
              show_default=True, help="Parallel compiles when the base must be built first.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def export_cmd(srcdir: Path | None, debian_version: str | None, output: Path, jobs: int,
               as_json: bool, quiet: bool) -> None:
    """Write a built base tree as one reproducible archive, named by the hypervisor's build-id.

    The same tree always gives the same bytes (sorted members, fixed times and owners, gzip
    without name or time); the first member, manifest.json, holds the build-id and the
    SHA-256 of every file.

    \b
    Exit status: 0 written, 2 bad input (no tree, an unbuilt tree that
    does not build, an output folder that does not exist).
    """
    from xsbuild.base_archive import archive_name, export_base

    progress = _silent if quiet else _progress
    top = _base_top(srcdir, debian_version, jobs, progress)
    from xsbuild.xensyms import read_build_id

    if output.is_dir():
        output = output / archive_name(read_build_id(top / "xen" / "xen-syms"))
    check_output(output, [])
    manifest = export_base(top, output, progress)
    doc = {"schema": "xsbuild.base-export/1", "archive": str(output),
           "xen_build_id": manifest.xen_build_id.hex(), "members": len(manifest.entries),
           "size": output.stat().st_size}
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(f"{output}: base of hypervisor {manifest.xen_build_id.hex()}, "
                   f"{len(manifest.entries)} members, {doc['size']} bytes")


def _base_top(srcdir: Path | None, debian_version: str | None, jobs: int,
              progress: Callable[[str], None]) -> Path:
    if (srcdir is None) == (debian_version is None):
        raise UsageError("give exactly one of --srcdir and --debian")
    if debian_version is not None:
        from xsbuild.debian import debian_base

        return debian_base(debian_version, jobs=jobs, progress=progress).top
    assert srcdir is not None
    if not srcdir.exists():
        raise UsageError(f"--srcdir {srcdir}: does not exist")
    from xsbuild.build import find_top
    from xsbuild.debian import cached_base_build

    top = find_top(srcdir)
    if (top / "xen" / "xen-syms").is_file() and (top / "xen" / ".config").is_file():
        return top
    return cached_base_build(top, jobs=jobs, progress=progress)


@base_group.command("import")
@click.argument("archive", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def import_cmd(archive: Path, as_json: bool, quiet: bool) -> None:
    """Unpack ARCHIVE into the cache, verified (manifest checksums, xen-syms build-id).

    Nothing is written to the cache unless every member checks out; an archive whose build-id
    is already in the cache is not unpacked again.  Prints the tree's path.

    \b
    Exit status: 0 imported (or already there), 2 not a base archive,
    a corrupted or truncated one, or one whose contents disagree with
    its manifest.
    """
    from xsbuild.base_archive import import_base

    res = import_base(archive, _silent if quiet else _progress)
    if as_json:
        click.echo(json.dumps({"schema": "xsbuild.base-import/1", "top": str(res.top),
                               "xen_build_id": res.xen_build_id.hex(),
                               "reused": res.reused}, indent=2))
    else:
        click.echo(str(res.top))


@cli.command("matrix")
@click.option("--patches", "patch_dir", required=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of advisories: one NAME.patch each.")
@click.option("--targets", "targets_file", required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="targets.toml: the hypervisor builds to build every advisory for.")
@click.option("--format", "fmt", type=click.Choice(["json", "github", "gitlab"]),
              default="json", show_default=True,
              help="json: the plan; github: lines for $GITHUB_OUTPUT; gitlab: a child "
                   "pipeline.")
@click.option("--payloads", "payload_dir", default="payloads", show_default=True,
              help="Folder the jobs write payloads into (payloads/TARGET/NAME.livepatch).")
def matrix_cmd(patch_dir: Path, targets_file: Path, fmt: str, payload_dir: str) -> None:
    """Print the CI job matrix: one `xsbuild build --base ... --prove` job per advisory and
    target.

    A stacked advisory (a `Depends: NAME` line in its patch's header, or `depends = [...]`
    under `[advisories.NAME]` in targets.toml) is built after the one it stacks on, in a
    later stage, with --depends set to that payload's build-id.

    \b
    Examples:
      xsbuild matrix --patches patches --targets targets.toml --format github >> "$GITHUB_OUTPUT"
      xsbuild matrix --patches patches --targets targets.toml --format gitlab > jobs.yml

    \b
    Exit status: 0 printed, 2 bad input (a bad targets.toml, a missing
    or cyclic dependency, an unknown advisory).
    """
    from xsbuild.matrix import format_github, format_gitlab, load_plan

    plan = load_plan(patch_dir, targets_file, payload_dir)
    if fmt == "github":
        sys.stdout.write(format_github(plan))
    elif fmt == "gitlab":
        sys.stdout.write(format_gitlab(plan))
    else:
        click.echo(json.dumps(plan.to_json(), indent=2))


@cli.command("index")
@click.option("--payloads", "payload_dir", default="payloads", show_default=True,
              type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of payloads/TARGET/NAME.livepatch (with the jobs' NAME.build.json).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Index file to write (default: PAYLOADS/index.json).")
def index_cmd(payload_dir: Path, output: Path | None) -> None:
    """Write the index of built payloads that the rollout side consumes (schema
    xsbuild.index/1): per payload its name, target build-id, build-id, depends, SHA-256 and
    proof status.

    \b
    Examples:
      xsbuild index --payloads payloads        # writes payloads/index.json

    \b
    Exit status: 0 written, 2 bad input (a file that is not a payload,
    no payloads at all).
    """
    from xsbuild.index import build_index, write_index

    output = output or payload_dir / "index.json"
    check_output(output, [])
    index = build_index(payload_dir)
    write_index(index, output)
    click.echo(f"{output}: {len(index['payloads'])} payload(s) "  # type: ignore[arg-type]
               f"for {len({p['xen_build_id'] for p in index['payloads']})} hypervisor(s)")  # type: ignore[attr-defined,index]
