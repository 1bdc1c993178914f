"""``xsbuild inspect`` and ``explain``: review a payload, or a diff, the way one reviews a patch."""

from __future__ import annotations

from pathlib import Path

import click

from xsbuild.cli import cli
from xsbuild.cli.common import check_output
from xsbuild.errors import UsageError

_EXISTING = click.Path(exists=True, dir_okay=False, path_type=Path)
_FORMAT = click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]),
                       default="text", show_default=True,
                       help="text for a terminal or a review comment; json (versioned schema, "
                            "see docs/json-schema/) for CI; html for one self-contained page.")
_OUTPUT = click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
                       help="Write the report to this file (atomically) instead of stdout.")


def _emit(text: str, output: Path | None) -> None:
    """The whole report or nothing: rendered before anything is written, then one rename."""
    if output is None:
        click.echo(text, nl=False)
        return
    from xsbuild.elf import write_atomic

    try:
        write_atomic(output, text.encode())
    except OSError as exc:
        raise UsageError(f"{output}: cannot write: {exc.strerror or exc}") from exc


@cli.command("inspect")
@click.argument("payload", type=_EXISTING)
@click.option("--xen-syms", type=_EXISTING,
              help="The hypervisor the payload is for: shows the code each function replaces, "
                   "resolves addresses left to the loader, names its build-id, and checks the "
                   "payload against it.")
@click.option("--payload", "others", multiple=True, type=_EXISTING, metavar="OTHER",
              help="A payload loaded before this one (repeatable): a depends note equal to its "
                   "build-id is named after it, and its symbols count as loaded in the check.")
@click.option("--proof", "proof", type=_EXISTING, metavar="PROOF_JSON",
              help="An `xsbuild prove --format json` report of this payload: the HTML shows "
                   "each function's proof next to its code.")
@_FORMAT
@_OUTPUT
def inspect_cmd(payload: Path, xen_syms: Path | None, others: tuple[Path, ...], proof: Path | None,
                fmt: str, output: Path | None) -> None:
    """Show what PAYLOAD changes, before it reaches a host.

    The funcs table (each patched function's old and new address and size, source file), the
    functions and data the payload brings, hooks, dependencies and whom they belong to,
    relocations grouped by target, special-section entries (alternatives, exception table, bug
    frames, .modinfo) with the function each belongs to, and the disassembly of every function,
    relocation targets shown as symbols. With --xen-syms, each replaced function's old code is
    shown beside the new.

    \b
    Examples:
      xsbuild inspect fix.livepatch --xen-syms xen-syms
      xsbuild inspect fix.livepatch --xen-syms xen-syms --format html -o fix.html
      xsbuild inspect second.livepatch --payload first.livepatch --format json
      xsbuild inspect fix.livepatch --format html --proof proof.json -o fix.html

    \b
    Exit status: 0 report written (a payload Xen would reject is reported,
    see loader.ok in JSON; `xsbuild check` is the gate), 2 bad input.
    """
    from xsbuild.inspection import inspect_payload, load_other_payload
    from xsbuild.report import render
    from xsbuild.xensyms import XenSymbols

    if output is not None:
        check_output(output, (payload, *others, *([xen_syms] if xen_syms else [])))

    xs = XenSymbols.load(xen_syms) if xen_syms else None
    loaded = [load_other_payload(p) for p in others]
    report = inspect_payload(payload, xs, loaded)
    if proof is not None:
        _attach_proof(report, proof)
    _emit(render(report, fmt), output)


def _attach_proof(report: object, path: Path) -> None:
    """Index an xsbuild.prove/1 report's functions by Xen name and by plain name."""
    import json

    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"--proof {path}: not a JSON proof: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != "xsbuild.prove/1":
        raise UsageError(f"--proof {path}: not an xsbuild.prove/1 report "
                         "(xsbuild prove --format json)")
    by_name: dict[str, dict[str, object]] = {}
    for entry in doc.get("functions", []):
        name = str(entry.get("name", ""))
        by_name[name] = entry
        by_name.setdefault(name.rpartition("#")[2], entry)
    report.proof = by_name  # type: ignore[attr-defined]
    report.proof_verdict = str(doc.get("verdict", ""))  # type: ignore[attr-defined]


@cli.command("explain")
@click.argument("orig", type=_EXISTING)
@click.argument("patched", type=_EXISTING)
@click.option("--new-static", "new_statics", multiple=True, metavar="NAME",
              help="As for `xsbuild diff`: accept this static local as new. Repeatable.")
@_FORMAT
@_OUTPUT
def explain_cmd(orig: Path, patched: Path, new_statics: tuple[str, ...], fmt: str,
                output: Path | None) -> int:
    """Explain what `xsbuild diff ORIG PATCHED` decides, and why.

    For every function of both objects: same, changed, new or removed, and why: the first
    differing instruction (old and new), a relocation that now points elsewhere, a string
    literal that changed. Then what the payload would carry and which reference pulled each
    piece in, and what was refused and why. A refused change is explained too.

    \b
    Examples:
      xsbuild explain orig/common/version.o patched/common/version.o
      xsbuild explain orig.o patched.o --format html -o explain.html

    \b
    Exit status (as `xsbuild diff`): 0 changes found, 3 no functional change,
    1 refused (the report says why), 2 bad input.
    """
    from xsbuild.explain import explain_files
    from xsbuild.report import render

    if output is not None:
        check_output(output, (orig, patched))

    report = explain_files(orig, patched, allow_new_statics=new_statics)
    _emit(render(report, fmt), output)
    return report.exit_code
