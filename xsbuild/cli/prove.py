"""``xsbuild prove``: the payload's code is the patched hypervisor's code, nothing is missing."""

from __future__ import annotations

import json
from pathlib import Path

import click

from xsbuild.cli import cli
from xsbuild.cli.common import check_output
from xsbuild.errors import UsageError, XsbuildError

_EXISTING = click.Path(exists=True, dir_okay=False, path_type=Path)


class NotProvenError(XsbuildError):
    """The payload differs from the patched hypervisor (the report says where); exit 1."""

    return_code = 1


class CannotJudgeError(XsbuildError):
    """No proof could be made (the patched build failed, another hypervisor); exit 2."""

    return_code = 2


@cli.command("prove")
@click.argument("payload", type=_EXISTING)
@click.option("--srcdir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="The Xen source tree the payload was built from (its top, or its xen/); "
                   "never written.")
@click.option("--patch", "patches", multiple=True, required=True, type=_EXISTING,
              help="The source patch(es) the payload was built from, in order (-p1).")
@click.option("--xen-syms", type=_EXISTING,
              help="The original hypervisor's xen-syms (default: the tree's own; must be the "
                   "same build).")
@click.option("--format", "fmt", type=click.Choice(["text", "json", "html"]), default="text",
              show_default=True, help="json: schema xsbuild.prove/1 (docs/json-schema/).")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report to this file (atomically) instead of stdout.")
@click.option("-j", "--jobs", type=click.IntRange(1, 256), default=2, show_default=True,
              help="Parallel jobs of the patched build's make.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines.")
def prove_cmd(payload: Path, srcdir: Path, patches: tuple[Path, ...], xen_syms: Path | None,
              fmt: str, as_json: bool, output: Path | None, jobs: int, quiet: bool) -> None:
    """Prove PAYLOAD is what the patched source compiles to inside the hypervisor.

    Builds the patched hypervisor the way the tree builds itself (its own make, incremental
    from the built base, in a private copy of the tree in the cache), then checks that every
    function the payload carries is, instruction by instruction, that function of the patched
    xen-syms (targets compared by what they point at; unnamed code, alternatives, exception
    table and bug frames too), and that the functions the patch changes in the hypervisor are
    exactly those the payload carries.

    \b
    Example:
      xsbuild prove fix.livepatch --srcdir XEN_TREE --patch fix.patch
      xsbuild prove fix.livepatch --srcdir XEN_TREE --patch fix.patch --format json -o proof.json

    \b
    Exit status: 0 proven, 1 not proven (each difference: function,
    offset, both instructions; or the missing or extra function),
    2 cannot judge (why is said) or bad input.
    """
    from xsbuild.prove import ProveOptions, prove_payload

    fmt = "json" if as_json else fmt
    if output is not None:
        check_output(output, (payload, *patches, *([xen_syms] if xen_syms else [])))
    if not srcdir.exists():
        raise UsageError(f"--srcdir {srcdir}: does not exist")
    progress = (lambda _line: None) if quiet else (
        lambda line: click.echo(f"xsbuild: {line}", err=True))
    report = prove_payload(ProveOptions(payload, srcdir, patches, xen_syms, jobs), progress)
    emit_report(report, fmt, output)


def emit_report(report: object, fmt: str, output: Path | None) -> None:
    """Write the proof, then exit with its verdict's code (0 proven, 1, 2)."""
    from xsbuild.prove import ProofReport, report_html, report_text

    assert isinstance(report, ProofReport)
    if fmt == "json":
        text = json.dumps(report.to_json(), indent=2) + "\n"
    elif fmt == "html":
        text = report_html(report)
    else:
        text = report_text(report)
    if output is None:
        click.echo(text, nl=False)
    else:
        from xsbuild.elf import write_atomic

        try:
            write_atomic(output, text.encode())
        except OSError as exc:
            raise UsageError(f"{output}: cannot write: {exc.strerror or exc}") from exc
    exc = verdict_error(report)
    if exc is None:
        return
    if fmt == "json" and output is None:
        exc.json_reported = True  # type: ignore[attr-defined]
    raise exc


def verdict_error(report: object) -> XsbuildError | None:
    """The one-line error (exit 1 or 2) of a proof that did not prove; None if proven."""
    from xsbuild.prove import ProofReport, Verdict

    assert isinstance(report, ProofReport)
    if report.verdict is Verdict.CANNOT_JUDGE:
        return CannotJudgeError(f"{report.payload}: cannot judge: {report.reason}")
    if report.verdict is Verdict.NOT_PROVEN:
        first = report.differences()[0].describe()
        more = len(report.differences()) - 1
        return NotProvenError(f"{report.payload}: not proven: {first}"
                              + (f" (and {more} more)" if more else ""))
    return None
