"""``xsbuild build``: from a Xen source tree (or a Debian version) and patches to a payload."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xsbuild.cli import cli
from xsbuild.cli.common import check_output, parse_build_id_option
from xsbuild.errors import UsageError, XsbuildError

if TYPE_CHECKING:
    from xsbuild.build import BuildOptions


def _progress(line: str) -> None:
    click.echo(f"xsbuild: {line}", err=True)


def _silent(_line: str) -> None:
    pass


def _log_path(output: Path) -> Path:
    return output.with_name(output.name + ".log")


@cli.command("build")
@click.option("--srcdir", type=click.Path(file_okay=False, path_type=Path),
              help="Xen source tree (its top, or its xen/); built once into the cache if needed.")
@click.option("--debian", "debian_version", metavar="VERSION",
              help="Use Debian's xen VERSION (e.g. 4.17.5+72-g01140da4e8-1): fetch the source "
                   "and -dbg xen-syms, rebuild bit-identically once, cache it.")
@click.option("--base", "base_archive", metavar="ARCHIVE",
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Use a base archive (`xsbuild base export`): imported into the cache once, "
                   "verified; no rebuild.  --xen-syms defaults to the base's.")
@click.option("--patch", "patches", multiple=True, required=True,
              type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Source patch (-p1, from the tree's top or from xen/); repeat for several, "
                   "applied in order.")
@click.option("--xen-syms", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="xen-syms of the running hypervisor (default with --debian: Debian's).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Payload file to write.")
@click.option("--depends", metavar="BUILD_ID",
              help="Build-id this payload stacks on (default: the hypervisor's).")
@click.option("--xen-depends", metavar="BUILD_ID",
              help="Hypervisor build-id (default: that of --xen-syms).")
@click.option("--name", help="Payload name (default: the first patch's file name).")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=os.cpu_count() or 1,
              show_default=True, help="Parallel compiles and diffs.")
@click.option("--prelink", is_flag=True, help="Resolve hypervisor symbols at build time.")
@click.option("--no-self-check", is_flag=True,
              help="Do not verify that recompiling the unpatched sources reproduces the tree's "
                   "objects (faster, less safe).")
@click.option("--new-static", "new_statics", multiple=True, metavar="NAME",
              help="Accept NAME as a new static local (its state starts fresh); repeatable.")
@click.option("--allow-layout-change", "allow_layout_changes", multiple=True, metavar="TYPE",
              help="Let the patch change the layout of TYPE ('struct domain', or 'domain'): "
                   "only when no live instance or unchanged code depends on it; repeatable.")
@click.option("--prove", "prove", is_flag=True,
              help="Then prove the payload (see `xsbuild prove`): build the patched hypervisor "
                   "with the tree's own make and compare; exit 1 if not proven, 2 if it "
                   "cannot be judged.")
@click.option("--keep-workdir", is_flag=True, help="Keep the scratch directory (debugging).")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary on stdout (schema xsbuild.build/1).")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines; only errors and the result.")
def build_cmd(srcdir: Path | None, debian_version: str | None, base_archive: Path | None,
              patches: tuple[Path, ...],
              xen_syms: Path | None, output: Path, depends: str | None, xen_depends: str | None,
              name: str | None, jobs: int, prelink: bool, no_self_check: bool,
              new_statics: tuple[str, ...], allow_layout_changes: tuple[str, ...],
              prove: bool, keep_workdir: bool, as_json: bool, quiet: bool) -> None:
    """Build a live-patch payload from source patches, reusing the tree's built objects.

    \b
    Examples:
      xsbuild build --srcdir XEN_TREE --patch fix.patch --xen-syms xen-syms -o fix.livepatch
      xsbuild build --debian 4.17.5+72-g01140da4e8-1 --patch fix.patch -o fix.livepatch
      xsbuild build --base xsbuild-base-BUILD_ID.tar.gz --patch fix.patch -o fix.livepatch

    Writes OUTPUT and OUTPUT.log (also when the build fails: the error names it); the source
    tree is never modified.  A patch that changes the layout of a struct or union is refused
    (exit 1) unless --allow-layout-change names the type.

    \b
    Exit status: 0 payload written, 1 refused (an unpatchable change,
    a struct-layout change, a payload Xen would reject), 2 bad input
    (a missing tree, a patch that does not apply, a compile error, a
    stale tree), 3 no functional change, 5 xsbuild cannot reproduce
    one of the tree's objects (its own limitation: please report it).
    With --prove: 1 also when the payload is not proven, 2 when no
    proof can be made.
    """
    for path in (output, _log_path(output)):
        check_output(path, (*patches, *([xen_syms] if xen_syms else [])))
    if srcdir is not None and not srcdir.exists():
        raise UsageError(f"--srcdir {srcdir}: does not exist")
    progress = _silent if quiet else _progress
    try:
        if base_archive is not None:
            srcdir, xen_syms = _imported_base(srcdir, debian_version, base_archive, xen_syms,
                                              progress)
        opts = _options(srcdir, debian_version, patches, xen_syms, output, depends, xen_depends,
                        name, jobs, prelink, no_self_check, keep_workdir, progress)
        opts = dataclasses.replace(opts, new_statics=new_statics,
                                   allow_layout_changes=allow_layout_changes)
        from xsbuild.build import build_payload  # loaded by `build` only: start-up of the rest

        summary = build_payload(opts, progress)
    except XsbuildError as exc:
        log = _log_path(output)
        if log.is_file() and exc.args:  # say where the log is, in the one error line
            exc.args = (f"{exc} (log: {log})", *exc.args[1:])
        raise
    proof = _prove(summary.payload, summary.base_top, opts, progress) if prove else None
    if as_json:
        doc = summary.to_json()
        if proof is not None:
            doc["proof"] = proof.to_json()
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        click.echo(f"{summary.payload}: {summary.name}, build-id {summary.build_id.hex()}, "
                   f"{len(summary.functions('changed_functions'))} changed and "
                   f"{len(summary.functions('new_functions'))} new function(s) from "
                   f"{len(summary.capture.changed)} object(s); log {summary.log}")
        if proof is not None:
            from xsbuild.prove import report_text

            click.echo(report_text(proof), nl=False)
    if proof is not None:
        from xsbuild.cli.prove import verdict_error

        exc = verdict_error(proof)
        if exc is not None:
            if as_json:
                exc.json_reported = True  # type: ignore[attr-defined]
            raise exc


def _prove(payload: Path, top: Path, opts: BuildOptions, progress: Callable[[str], None]
           ) -> object:
    """``--prove``: the proof of the payload just written (:mod:`xsbuild.prove`)."""
    from xsbuild.prove import ProveOptions, prove_payload

    return prove_payload(ProveOptions(payload, top, opts.patches, opts.xen_syms, opts.jobs),
                         progress)


def _imported_base(srcdir: Path | None, debian_version: str | None, archive: Path,
                   xen_syms: Path | None, progress: Callable[[str], None]) -> tuple[Path, Path]:
    """--base ARCHIVE: the cached tree of the archive's hypervisor (see xsbuild.base_archive)."""
    if srcdir is not None or debian_version is not None:
        raise UsageError("give only one of --srcdir, --debian and --base")
    from xsbuild.base_archive import import_base

    top = import_base(archive, progress).top
    return top, xen_syms or top / "xen" / "xen-syms"


def _options(srcdir: Path | None, debian_version: str | None, patches: tuple[Path, ...],
             xen_syms: Path | None, output: Path, depends: str | None, xen_depends: str | None,
             name: str | None, jobs: int, prelink: bool, no_self_check: bool,
             keep_workdir: bool, progress: Callable[[str], None] = _progress) -> BuildOptions:
    if (srcdir is None) == (debian_version is None):
        raise UsageError("give exactly one of --srcdir, --debian and --base")
    if debian_version is not None:
        from xsbuild.debian import debian_base

        base = debian_base(debian_version, jobs=jobs, progress=progress)
        srcdir, xen_syms = base.top, xen_syms or base.xen_syms
    if xen_syms is None:
        raise UsageError("--xen-syms is required with --srcdir (the running hypervisor's "
                         "xen-syms, with symbols)")
    assert srcdir is not None
    from xsbuild.build import BuildOptions

    return BuildOptions(srcdir=srcdir, patches=patches, xen_syms=xen_syms, output=output,
                        depends=parse_build_id_option("--depends", depends),
                        xen_depends=parse_build_id_option("--xen-depends", xen_depends),
                        name=name, jobs=jobs, prelink=prelink, self_check=not no_self_check,
                        keep_workdir=keep_workdir)
