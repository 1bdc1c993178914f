"""``xsbuild demo``: the pipeline on the bundled example, step by step."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import click

from xsbuild.cli import cli
from xsbuild.errors import UsageError

if TYPE_CHECKING:
    from xsbuild.demo import DemoReport


@cli.command("demo")
@click.option("-w", "--workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep every file of the demo here (a new or empty directory); by default a "
                   "temporary directory is used and removed at the end.")
def demo_cmd(workdir: Path | None) -> None:
    """Build a live patch from a source patch and run it, on a bundled example.

    The example is a tiny stand-in for Xen's common/version.c with a bug (it accepts a domain
    with zero vCPUs) and fix.patch. The demo compiles it with Xen 4.17's exact flags, links a
    stand-in xen-syms, runs `xsbuild diff`, `link` and `check`, then loads the stand-in
    hypervisor in a child process, applies the payload, calls the patched functions, and
    reverts it. Needs gcc, ld and patch (Debian: build-essential). No hypervisor, no root.

    \b
    Example:
      xsbuild demo                  # show everything, keep nothing
      xsbuild demo -w demo-out      # keep sources, objects, xen-syms and demo.livepatch
    """
    from xsbuild.demo import run_demo

    if workdir is not None and not workdir.absolute().parent.is_dir():
        raise UsageError(f"-w {workdir}: directory {workdir.absolute().parent} does not exist "
                         "(the work directory itself is created, its parent is not)")
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="xsbuild-demo-")) if workdir is None else workdir
    count = 0

    def progress(title: str) -> None:
        nonlocal count
        count += 1
        click.echo(f"[{count}/6] {title}", err=True)

    try:
        report = run_demo(root / "demo" if temporary else root, progress)
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    click.echo()
    for n, step in enumerate(report.steps, 1):
        click.secho(f"{n}. {step.title}", bold=True)
        click.echo(f"   $ {step.command}")
        for line in step.lines:
            click.echo(f"     {line}")
    click.echo()
    _table(report)
    click.echo()
    click.echo("The applied payload behaves exactly like the patched build, state included; "
               "reverting restores the original code.")
    if not temporary:
        click.echo(f"Files kept in {root}: try `xsbuild check {root}/demo.livepatch "
                   f"--xen-syms {root}/xen-syms`.")


def _table(report: DemoReport) -> None:
    rows = [("call", "before", "patch applied", "reverted", "what it shows")]
    for i, c in enumerate(report.calls):
        call = f"{c.fn}({', '.join(map(str, c.args))})"
        rows.append((call, _show(report.before[i]), _show(report.applied[i]),
                     _show(report.reverted[i]), c.what))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    for n, row in enumerate(rows):
        text = "  ".join(cell.ljust(widths[k]) for k, cell in enumerate(row[:4]))
        click.secho(f"  {text}  {row[4]}", bold=n == 0)


def _show(value: object) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)
