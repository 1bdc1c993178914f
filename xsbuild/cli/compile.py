"""``xsbuild diff``, ``link`` and ``check``: the core compiler's commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xsbuild.cli import cli
from xsbuild.cli.common import check_name, check_output, mark_reported, parse_build_id_option
from xsbuild.errors import EXIT_NO_CHANGE, EXIT_REFUSED, UnsupportedChangeError, UsageError

if TYPE_CHECKING:
    from xsbuild.check import CheckReport
    from xsbuild.inspection import OtherPayload
    from xsbuild.xensyms import XenSymbols

_EXISTING = click.Path(exists=True, dir_okay=False, path_type=Path)
_QUIET = click.option("-q", "--quiet", is_flag=True,
                      help="Print only errors (and the one-line result where there is one).")


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
@_QUIET
def diff_cmd(orig: Path, patched: Path, output: Path | None, as_json: bool,
             new_statics: tuple[str, ...], quiet: bool) -> int:
    """Compare ORIG and PATCHED objects of one source file, function by function.

    Both must be built with the hypervisor's flags (-ffunction-sections -fdata-sections and the
    rest). Writes OUT with the changed functions, the new things they use and the special-section
    entries that belong to them; `xsbuild link` turns one or more of those into a payload.

    \b
    Examples:
      xsbuild diff orig/common/version.o patched/common/version.o -o out/version.o
      xsbuild diff orig.o patched.o --json      # what would change, nothing written

    \b
    Exit status: 0 changes found, 3 no functional change, 1 refused (an
    unpatchable change; each problem names object, section and symbol),
    2 bad input.  --json: schema xsbuild.diff/1 (docs/json-schema/).
    """
    from xsbuild.diff import diff_files

    if output is not None:
        check_output(output, (orig, patched))
    try:
        result = diff_files(orig, patched, output, allow_new_statics=new_statics)
    except UnsupportedChangeError as exc:
        if as_json:
            _emit_json({"schema": "xsbuild.diff/1", "object": str(patched), "status": "refused",
                        "changed_functions": [], "new_functions": [], "new_data": [],
                        "included": [], "hooks": [], "notes": [],
                        "refused": [{"message": m} for m in exc.problems]})
            mark_reported(exc)
        raise
    if as_json:
        _emit_json(result.to_json())
    elif not quiet:
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
        if not as_json and not quiet:
            click.echo(f"{patched}: no functional change", err=True)
        return EXIT_NO_CHANGE
    if output is None and not as_json and not quiet:
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
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary on stdout (schema xsbuild.link/1).")
@_QUIET
def link_cmd(objects: tuple[Path, ...], output: Path, xen_syms: Path, xen_depends: str | None,
             depends: str | None, name: str | None, prelink: bool, as_json: bool,
             quiet: bool) -> None:
    """Link diff objects (from `xsbuild diff`) into one payload for the hypervisor XEN_SYMS.

    Fills each patched function's address and size from xen-syms, checks every symbol the
    payload needs exists there, adds the build-id notes, and writes the payload only if it passes
    the same checks as `xsbuild check`.

    \b
    Examples:
      xsbuild link out/*.o -o fix.livepatch --xen-syms xen-syms
      xsbuild link out/*.o -o second.livepatch --xen-syms xen-syms \\
          --depends 12899ad77dd5309ce4d626cb4b55b12339286ee1   # stacked on a payload

    \b
    Exit status: 0 payload written, 1 refused (Xen would reject it: a
    symbol missing from xen-syms, a check that fails; nothing written),
    2 bad input.  A build-id is hex, at least 8 bytes (ld makes 8, 16 or 20).
    """
    from xsbuild.linker import link_files

    check_output(output, (*objects, xen_syms))
    deps = parse_build_id_option("--depends", depends)
    xen_deps = parse_build_id_option("--xen-depends", xen_depends)
    result = link_files(list(objects), output, xen_syms=xen_syms,
                        name=check_name("--name", name), depends=deps, xen_depends=xen_deps,
                        prelink=prelink)
    if as_json:
        _emit_json(result.to_json())
        return
    for f in result.funcs if not quiet else ():
        click.echo(f"patches {f.name} at {f.old_addr:#x} ({f.old_size} bytes)")
    click.echo(f"wrote {output} ({result.size} bytes), build-id {result.build_id.hex()}")


@cli.command("check")
@click.argument("payload", type=_EXISTING)
@click.option("--xen-syms", type=_EXISTING,
              help="The target hypervisor: also check symbols, function sizes, build-id and "
                   "name clashes against it; its Xen version selects the loader's rules.")
@click.option("--xen-version", metavar="X.Y[.Z]",
              help="The target's Xen release when there is no xen-syms (or to confirm it): "
                   "selects the loader's rules of that release (spec §8).")
@click.option("--payload", "others", multiple=True, type=_EXISTING, metavar="OTHER",
              help="A payload loaded before this one (repeatable): its symbols and build-id "
                   "count as loaded, and a depends note may name its build-id.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON on stdout (schema xsbuild.check/1).")
def check_cmd(payload: Path, xen_syms: Path | None, xen_version: str | None,
              others: tuple[Path, ...], as_json: bool) -> int:
    """Validate PAYLOAD offline the way the target Xen's loader will at upload.

    Every problem is printed with the error code Xen would return (-EINVAL, -ENOENT, ...), in
    the order that Xen release checks them.  The release is read from --xen-syms (its embedded
    .config, else its version functions) or given with --xen-version; without either only the
    rules every release since 4.17 shares are applied.  Without --xen-syms only what the payload
    alone determines is checked.  With --xen-syms, .livepatch.depends must also be the
    hypervisor's build-id or that of a payload given with --payload: anything else can be
    uploaded but never applied (-EINVAL at APPLY).  A "hazard" is a payload that release accepts
    but then misbehaves with (crashes the host, patches the wrong bytes): refused too.

    \b
    Examples:
      xsbuild check fix.livepatch --xen-syms xen-syms
      xsbuild check fix.livepatch --xen-version 4.19.6
      xsbuild check second.livepatch --xen-syms xen-syms --payload first.livepatch

    \b
    Exit status: 0 Xen would accept it, 1 Xen would reject it, 2 bad input
    (not an ELF file, truncated, another machine, a missing file, a bad or
    contradicting --xen-version).
    """
    from xsbuild.check import check_payload
    from xsbuild.elf import check_elf_header
    from xsbuild.inspection import load_other_payload
    from xsbuild.xen_versions import target_for
    from xsbuild.xensyms import XenSymbols

    try:
        data = payload.read_bytes()
    except OSError as exc:
        raise UsageError(f"{payload}: cannot read: {exc.strerror or exc}") from None
    check_elf_header(str(payload), data)  # bad input is exit 2, not a rejected payload
    xs = XenSymbols.load(xen_syms) if xen_syms else None
    target = target_for(xen_version, xs)
    loaded = [load_other_payload(p) for p in others]
    report = check_payload(data, xs, loaded=[o.info for o in loaded], target=target)
    _check_depends(report, xs, xen_syms, loaded)
    if as_json:
        _emit_json(_check_json(payload, xen_syms, report))
    else:
        for p in report.problems:
            kind = " (hazard: Xen accepts it)" if p.kind == "hazard" else ""
            click.echo(f"{payload}: {p}{kind}")
        if report.ok:
            scope = "against " + str(xen_syms) if xen_syms else "(payload only; give --xen-syms)"
            click.echo(f"{payload}: OK {scope}, with the loader rules of {target.describe()}")
        else:
            click.echo(f"{payload}: checked with the loader rules of {target.describe()}")
    return 0 if report.ok else EXIT_REFUSED


def _check_depends(report: CheckReport, xs: XenSymbols | None, xen_syms: Path | None,
                   loaded: list[OtherPayload]) -> None:
    """.livepatch.depends must name the hypervisor or a payload given with --payload."""
    from xsbuild.check import Problem
    from xsbuild.xen_abi import EINVAL

    info = report.info
    if xs is None or info is None or not info.depends:
        return
    known = {xs.build_id: f"{xen_syms}", **{o.info.build_id: o.path for o in loaded}}
    if info.depends not in known:
        report.problems.append(Problem(EINVAL, (
            f".livepatch.depends {info.depends.hex()} is the build-id of neither "
            f"{xen_syms} ({xs.build_id.hex()})"
            + "".join(f" nor {o.path}" for o in loaded)
            + ": APPLY would fail; give the payload it stacks on with --payload")))


def _check_json(payload: Path, xen_syms: Path | None, report: CheckReport) -> dict[str, object]:
    from xsbuild.xen_versions import RULES

    info, target = report.info, report.target
    return {
        "schema": "xsbuild.check/1", "payload": str(payload), "ok": report.ok,
        "checked_against": str(xen_syms) if xen_syms else None,
        "problems": [{"errno": p.errno, "error": f"-{_errname(p.errno)}",
                      "message": p.message, "kind": str(p.kind)} for p in report.problems],
        "build_id": info.build_id.hex() if info else None,
        "depends": info.depends.hex() if info else None,
        "xen_depends": info.xen_depends.hex() if info else None,
        "xen_version": {
            "version": str(target.version) if target.version else None,
            "source": str(target.source),
            "alternative_call": target.alternative_call,
            "rules": {str(rule): target.has(rule) for rule in RULES},
        },
    }


def _errname(errno: int) -> str:
    from xsbuild.xen_abi import errno_name

    return errno_name(errno)
