"""The ``xsbuild`` command line: one click group, one error handler.

Every subcommand lives in a module of this package and registers itself on :data:`cli`.  Library
code raises :class:`xsbuild.errors.XsbuildError`; :func:`main` prints it as one line and exits
with the class's code.  No module below ``cli/`` calls ``sys.exit``.

Exit codes (also in the README):
  0  success (``diff``/``build``: changes found)
  1  refused: an unpatchable change, a payload Xen would reject, a hypervisor error
  2  bad input or usage
  3  no functional change
  4  hypervisor busy (EBUSY/EAGAIN): retrying may succeed
  5  ``build``: xsbuild cannot reproduce one of the tree's objects (its limitation)
  70 internal error (a bug in xsbuild)
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

import click

from xsbuild import __version__
from xsbuild.errors import EXIT_BAD_INPUT, EXIT_INTERNAL, XsbuildError

EPILOG = """\b
Exit codes: 0 ok (diff: changes found), 1 refused (unpatchable change,
payload Xen would reject, hypervisor error), 2 bad input or usage,
3 no functional change, 4 hypervisor busy (retry), 5 build: xsbuild
cannot reproduce an object of the tree (its limitation), 70 internal error.
Set XSBUILD_TRACEBACK=1 to see a Python traceback on errors."""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xsbuild")
@click.option("--debug", is_flag=True,
              help="Trace the differ's decisions (correlation, classification) on stderr.")
def cli(debug: bool) -> None:
    """Turn a Xen source patch into a live-patch payload, check it, inspect it, apply it.

    \b
    Typical flow:
      xsbuild diff orig/foo.o patched/foo.o -o out/foo.o
      xsbuild link out/*.o -o fix.livepatch --xen-syms xen-syms
      xsbuild check fix.livepatch --xen-syms xen-syms
      xsbuild load fix.livepatch            (in dom0)
    or all at once from a source tree: xsbuild build --srcdir xen --patch fix.patch ...
    Review a payload: xsbuild inspect fix.livepatch.  See it all run: xsbuild demo.
    """
    if debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                            format="xsbuild: debug: %(name)s: %(message)s")


def _register() -> None:
    # Import for the side effect of registering each command module's commands on ``cli``.
    import importlib

    for name in ("compile", "apply", "inspect", "build", "prove", "demo", "fleet"):
        try:
            importlib.import_module(f"xsbuild.cli.{name}")
        except ModuleNotFoundError as exc:  # a module not written yet
            if exc.name != f"xsbuild.cli.{name}":
                raise


def _json_requested(argv: list[str]) -> bool:
    return "--json" in argv


def _command_name(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-") and a in cli.commands), None)


def _fail(argv: list[str], exc: BaseException, code: int, text: str) -> None:
    """One line on stderr; with --json also the error object on stdout (docs/json-schema)."""
    from xsbuild.cli.common import print_error_object

    if _json_requested(argv) and not getattr(exc, "json_reported", False):
        print_error_object(_command_name(argv), exc, code)
    click.echo(f"xsbuild: error: {text}", err=True)
    sys.exit(code)


def _usage_text(exc: click.ClickException, argv: list[str]) -> str:
    """Click's four-line usage error as one line, pointing at the command's --help."""
    command = _command_name(argv)
    path = f"xsbuild {command}" if command else "xsbuild"
    return f"{exc.format_message()} (see '{path} --help')"


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI, turn errors into one line and an exit code."""
    _register()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rc = cli.main(args=args, prog_name="xsbuild", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("xsbuild: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `xsbuild`: the help is the answer
            click.echo(exc.format_message(), err=True)
            sys.exit(EXIT_BAD_INPUT)
        _fail(args, exc, EXIT_BAD_INPUT, _usage_text(exc, args))
    except XsbuildError as exc:
        if os.environ.get("XSBUILD_TRACEBACK"):
            traceback.print_exc()
        _fail(args, exc, exc.return_code, str(exc))
    except KeyboardInterrupt:
        click.echo("xsbuild: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if os.environ.get("XSBUILD_TRACEBACK"):
            traceback.print_exc()
        _fail(args, exc, EXIT_INTERNAL,
              f"internal error (a bug in xsbuild): {type(exc).__name__}: {exc}")
    # Commands return None (success) or an exit code such as EXIT_NO_CHANGE (ctx.exit works too).
    sys.exit(rc if isinstance(rc, int) else 0)
