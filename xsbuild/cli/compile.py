"""``xsbuild diff``, ``link`` and ``check``: the core compiler's commands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xsbuild.cli import cli
from xsbuild.errors import EXIT_NO_CHANGE, EXIT_REFUSED, UnsupportedChangeError

_EXISTING = click.Path(exists=True, dir_okay=False, path_type=Path)


def _emit_json(obj: object) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=False))


@cli.command("diff")
@click.argument("orig", type=_EXISTING)
@click.argument("patched", type=_EXISTING)
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Diff object to write (only when something changed).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@click.option("--new-static", "new_statics", multiple=True, metavar="NAME",
              help="Accept this static local as new although a changed function uses it "
                   "(its state starts from its initial value). Repeatable.")
def diff_cmd(orig: Path, patched: Path, output: Path | None, as_json: bool,
             new_statics: tuple[str, ...]) -> int:
    """Compare ORIG and PATCHED objects of one source file, function by function.

    Both must be built with the hypervisor's flags (-ffunction-sections -fdata-sections and the
    rest). Writes OUT with the changed functions, the new things they use and the special-section
    entries that belong to them; `xsbuild link` turns one or more of those into a payload.

    \b
    Exit status: 0 changes found, 3 no functional change, 1 refused (an
    unpatchable change; each problem names object, section and symbol),
    2 bad input.
    """
    from xsbuild.diff import diff_files

    try:
        result = diff_files(orig, patched, output, allow_new_statics=new_statics)
    except UnsupportedChangeError as exc:
        if as_json:
            _emit_json({"schema": "xsbuild.diff/1", "object": str(patched), "status": "refused",
                        "changed_functions": [], "new_functions": [], "new_data": [],
                        "refused": [{"message": m} for m in exc.problems]})
        raise
    if as_json:
        _emit_json(result.to_json())
    else:
        for u in result.changed_functions:
            click.echo(f"changed function: {u.xen_name} ({u.reason})")
        for u in result.new_functions:
            click.echo(f"new function: {u.name}")
        for u in result.new_data:
            click.echo(f"new data: {u.name}")
        for s in result.hook_sections:
            click.echo(f"hook: {s.name}")
        for n in result.notes:
            click.echo(f"note: {n}", err=True)
    if result.status == "no-change":
        if not as_json:
            click.echo(f"{patched}: no functional change", err=True)
        return EXIT_NO_CHANGE
    if output is None and not as_json:
        click.echo("(no -o given: nothing written)", err=True)
    return 0


@cli.command("link")
@click.argument("objects", nargs=-1, required=True, type=_EXISTING)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Payload file to write, conventionally NAME.livepatch.")
@click.option("--xen-syms", required=True, type=_EXISTING,
              help="The exact hypervisor the payload is for (its xen-syms, with symbols).")
@click.option("--xen-depends", metavar="BUILD_ID",
              help="Hypervisor build-id to require (default: xen-syms' own).")
@click.option("--depends", metavar="BUILD_ID",
              help="Build-id this payload stacks on: a previous payload's (see `xsbuild "
                   "inspect`), default the hypervisor's.")
@click.option("--name", help="Payload name recorded in .modinfo (default: output file stem).")
@click.option("--prelink", is_flag=True,
              help="Resolve every hypervisor symbol now (absolute), instead of at load.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def link_cmd(objects: tuple[Path, ...], output: Path, xen_syms: Path, xen_depends: str | None,
             depends: str | None, name: str | None, prelink: bool, as_json: bool) -> None:
    """Link diff objects (from `xsbuild diff`) into one payload for the hypervisor XEN_SYMS.

    Fills each patched function's address and size from xen-syms, checks every symbol the
    payload needs exists there, adds the build-id notes, and writes the payload only if it passes
    the same checks as `xsbuild check`.
    """
    from xsbuild.linker import link_files
    from xsbuild.xensyms import parse_build_id_arg

    result = link_files(list(objects), output, xen_syms=xen_syms, name=name,
                        depends=parse_build_id_arg(depends) if depends else None,
                        xen_depends=parse_build_id_arg(xen_depends) if xen_depends else None,
                        prelink=prelink)
    if as_json:
        _emit_json(result.to_json())
        return
    for f in result.funcs:
        click.echo(f"patches {f.name} at {f.old_addr:#x} ({f.old_size} bytes)")
    click.echo(f"wrote {output} ({result.size} bytes), build-id {result.build_id.hex()}")


@cli.command("check")
@click.argument("payload", type=_EXISTING)
@click.option("--xen-syms", type=_EXISTING,
              help="The target hypervisor: also check symbols, function sizes, build-id and "
                   "name clashes against it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def check_cmd(payload: Path, xen_syms: Path | None, as_json: bool) -> int:
    """Validate PAYLOAD offline the way Xen 4.17's loader will at upload.

    Every problem is printed with the error code Xen would return (-EINVAL, -ENOENT, ...).
    Without --xen-syms only what the payload alone determines is checked.

    \b
    Exit status: 0 Xen would accept it, 1 Xen would reject it, 2 bad input.
    """
    from xsbuild.check import check_payload
    from xsbuild.xensyms import XenSymbols

    xs = XenSymbols.load(xen_syms) if xen_syms else None
    report = check_payload(payload.read_bytes(), xs)
    if as_json:
        info = report.info
        _emit_json({
            "schema": "xsbuild.check/1", "payload": str(payload), "ok": report.ok,
            "checked_against": str(xen_syms) if xen_syms else None,
            "problems": [{"errno": p.errno, "error": f"-{_errname(p.errno)}",
                          "message": p.message} for p in report.problems],
            "build_id": info.build_id.hex() if info else None,
            "depends": info.depends.hex() if info else None,
            "xen_depends": info.xen_depends.hex() if info else None,
        })
    else:
        for p in report.problems:
            click.echo(f"{payload}: {p}")
        if report.ok:
            scope = "against " + str(xen_syms) if xen_syms else "(payload only; give --xen-syms)"
            click.echo(f"{payload}: OK {scope}")
    return 0 if report.ok else EXIT_REFUSED


def _errname(errno: int) -> str:
    from xsbuild.xen_abi import errno_name

    return errno_name(errno)
