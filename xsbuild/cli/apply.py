"""``xsbuild upload/apply/revert/replace/unload/list/load``: drive the hypervisor's livepatch op.

The same commands and meaning as Debian's ``xen-livepatch``, plus ``--json``, a bounded wait for
completion, rendezvous timeouts under the user's control with growing retries, and errors that
name the failed step, the payload's state now and what to do next.  Every command also runs
against the simulator (``--backend sim --sim-state FILE``), which is how CI tests them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from xsbuild import apply as lp
from xsbuild import xen_abi
from xsbuild.cli import cli
from xsbuild.cli.common import check_name
from xsbuild.errors import HypercallError, UsageError
from xsbuild.hypercall import BACKENDS, Backend, BackendChoice, open_backend

_BACKEND_HELP = """\b
Where the hypervisor is:
  auto     privcmd when /dev/xen/privcmd exists (default)
  privcmd  this dom0's hypervisor, through /dev/xen/privcmd (root)
  libxc    the same through Xen's libxenctrl.so (if installed)
  sim      a simulated Xen kept in --sim-state FILE (4.17.5 unless
           XSBUILD_SIM_XEN_VERSION says another: 4.18.0 ... 4.21.2)
The simulator's host can be made difficult through the environment:
XSBUILD_SIM_CPU_DELAYS=0,5ms (CPU arrival delays: a late CPU makes the
rendezvous time out), XSBUILD_SIM_POLLS=N (status checks before an action
completes; -1 never), XSBUILD_SIM_WAITQUEUE=1, XSBUILD_SIM_INTERFACE=0x16."""


_FORCE = click.option(
    "--force", is_flag=True,
    help="Upload with LIVEPATCH_FLAG_FORCE (Xen 4.19 and later; refused at once against an "
         "older hypervisor, whose livepatch op has no flags).")


@dataclass(frozen=True, slots=True)
class CommonArgs:
    """The options every command shares, typed at once."""

    backend: BackendChoice
    json: bool


@dataclass(frozen=True, slots=True)
class TimingArgs:
    """The options of commands that run an action."""

    timeout: str
    retries: int
    timeout_start: str
    wait: float
    verbose: bool = False

    def options(self, nodeps: bool = False) -> lp.ActionOptions:
        return lp.ActionOptions(timeout_ns=lp.parse_duration_ns(self.timeout),
                                retries=self.retries,
                                timeout_start_ns=lp.parse_duration_ns(self.timeout_start),
                                wait_s=self.wait, nodeps=nodeps)


def _common(func: Callable[..., Any]) -> Callable[..., Any]:
    """Backend selection and --json, shared by every command."""
    decorators = [
        click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                     envvar="XSBUILD_BACKEND", help="Which hypervisor to talk to (see below)."),
        click.option("--sim-state", metavar="FILE", envvar="XSBUILD_SIM_STATE",
                     help="Simulator state file, created by the first command given "
                          "--sim-xen-syms; its folder must exist (env XSBUILD_SIM_STATE)."),
        click.option("--sim-xen-syms", metavar="XEN_SYMS", type=click.Path(dir_okay=False),
                     help="Create the simulator's hypervisor from this xen-syms (its build-id, "
                          "and its symbols for upload checks)."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the result as JSON on stdout (docs/json-schema/; on failure "
                          "an xsbuild.error/1 object, and the error line on stderr)."),
    ]
    for deco in reversed(decorators):
        func = deco(func)
    return func


def _timing(func: Callable[..., Any]) -> Callable[..., Any]:
    """Rendezvous timeout, retries and the completion wait."""
    decorators = [
        click.option("--timeout", default="30ms", show_default=True, metavar="DURATION",
                     help="Longest time the hypervisor may hold every CPU waiting for the "
                          "rendezvous (guests stop meanwhile). 30ms, 500us, 1s or ns."),
        click.option("--retries", type=click.IntRange(min=0), default=0, show_default=True,
                     help="When the CPUs cannot be gathered in time (-EBUSY), try again this "
                          "many times with timeouts growing geometrically from --timeout-start; "
                          "the last attempt uses --timeout."),
        click.option("--timeout-start", default="1ms", show_default=True, metavar="DURATION",
                     help="First rendezvous timeout when --retries is given."),
        click.option("--wait", type=click.FloatRange(min=0, min_open=True),
                     default=lp.DEFAULT_WAIT_S, show_default=True, metavar="SECONDS",
                     help="How long to poll for an action to complete before giving up "
                          "(the action stays pending in the hypervisor)."),
        click.option("-v", "--verbose", is_flag=True,
                     help="Print the rendezvous timeout of each attempt on stderr."),
    ]
    for deco in reversed(decorators):
        func = deco(func)
    return func


def _args(backend: str, sim_state: str | None, sim_xen_syms: str | None,
          as_json: bool) -> CommonArgs:
    return CommonArgs(BackendChoice(backend, sim_state, sim_xen_syms), as_json)


def _with_backend(args: CommonArgs, work: Callable[[Backend], Any]) -> Any:
    """Run ``work`` on the chosen backend (``xsbuild.cli.main`` reports failures, with --json
    also as an error object on stdout)."""
    backend = open_backend(args.backend)
    try:
        return work(backend)
    finally:
        backend.close()


def _schedule(opts: lp.ActionOptions, timing: TimingArgs) -> None:
    """--verbose: the rendezvous timeouts the attempts will use."""
    if timing.verbose:
        steps = opts.timeouts()
        click.echo(f"xsbuild: rendezvous timeouts: {', '.join(map(lp.format_ns, steps))} "
                   f"({len(steps)} attempt{'s' if len(steps) > 1 else ''} at most)", err=True)


def _emit(args: CommonArgs, text: str, data: dict[str, object], schema: str) -> None:
    if args.json:
        click.echo(json.dumps({"schema": schema, **data}, indent=2))
    else:
        click.echo(text)


def _action_text(res: lp.ActionResult) -> str:
    action = lp.ACTIONS[res.action]
    if not res.changed:
        return f"{res.name}: no action needed ({res.state_after})."
    if res.state_after == lp.GONE:
        return f"{action.verb} {res.name}... completed: {res.name} is unloaded."
    tries = "" if len(res.attempts) < 2 else f" after {len(res.attempts)} attempts"
    timeout = lp.format_ns(res.attempts[-1].timeout_ns) if action.asynchronous else ""
    detail = f" (rendezvous timeout {timeout}{tries})" if timeout else ""
    return f"{action.verb} {res.name}... completed: {res.state_after}{detail}."


_EPILOG = """\b
Exit codes: 0 done (or nothing to do), 1 refused by the hypervisor (or,
before any hypercall, by the offline check), 2 bad usage or input (not an
ELF file, truncated, another machine; --force against a hypervisor older
than 4.19), 4 hypervisor busy (CPUs not gathered
in time, another action pending): the same command may succeed later,
e.g. with --retries."""


def _help(summary: str, examples: str) -> str:
    """A command's help: what it does, examples, then where the hypervisor is."""
    return f"{summary}\n\n\b\nExamples:\n{examples}\n\n{_BACKEND_HELP}"


def _action_command(key: str, summary: str, examples: str, nodeps: bool = False) -> None:
    """Register ``xsbuild <key> NAME`` running :data:`xsbuild.apply.ACTIONS` ``[key]``."""

    @click.argument("name")
    @_timing
    @_common
    def command(name: str, backend: str, sim_state: str | None, sim_xen_syms: str | None,
                as_json: bool, timeout: str, retries: int, timeout_start: str, wait: float,
                verbose: bool, nodeps: bool = False) -> None:
        args = _args(backend, sim_state, sim_xen_syms, as_json)
        timing = TimingArgs(timeout, retries, timeout_start, wait, verbose)
        opts = timing.options(nodeps)
        _schedule(opts, timing)
        res = _with_backend(args, lambda b: lp.run_action(b, key, name, opts))
        _emit(args, _action_text(res), res.to_json(), "xsbuild.action/1")

    if nodeps:
        command = click.option(
            "--nodeps", is_flag=True,
            help="Skip the .livepatch.depends check (the payload it was built on top of "
                 "need not be the last one applied).")(command)
    command.__doc__ = summary
    cli.command(key, help=_help(summary, examples), epilog=_EPILOG)(command)


_action_command("apply", "Apply the uploaded payload NAME (CHECKED -> APPLIED).\n\n"
                "Its .livepatch.depends must match the hypervisor's build-id, or the payload "
                "applied last. The hypervisor patches while every CPU is held in a rendezvous; "
                "--timeout bounds how long.",
                "  xsbuild apply fix\n"
                "  xsbuild apply fix --retries 6 --timeout-start 1ms --timeout 100ms -v",
                nodeps=True)
_action_command("revert", "Revert the applied payload NAME (APPLIED -> CHECKED).\n\n"
                "Only the most recently applied payload can be reverted.",
                "  xsbuild revert fix\n  xsbuild revert fix --retries 4 --json")
_action_command("replace", "Revert every applied payload, newest first, then apply NAME.\n\n"
                "NAME's .livepatch.depends must be the hypervisor's build-id; payloads with "
                "pre/post hooks veto it.",
                "  xsbuild replace fix2        # after: xsbuild upload fix2 fix2.livepatch")
_action_command("unload", "Unload the CHECKED payload NAME (revert it first if APPLIED).",
                "  xsbuild unload fix          # after: xsbuild revert fix")


@cli.command("upload", epilog=_EPILOG, help=_help(
    "Upload payload FILE under NAME; the hypervisor checks it and keeps it CHECKED.\n\n"
    "Nothing is patched yet: `xsbuild apply NAME` does that.  The offline check "
    "(`xsbuild check FILE`) runs first: a file Xen's loader would refuse is named before any "
    "hypercall.",
    "  xsbuild upload fix fix.livepatch\n"
    "  xsbuild upload fix fix.livepatch --backend sim --sim-state sim.state "
    "--sim-xen-syms xen-syms"))
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@_FORCE
@_common
def upload_cmd(name: str, file: str, force: bool, backend: str, sim_state: str | None,
               sim_xen_syms: str | None, as_json: bool) -> None:
    args = _args(backend, sim_state, sim_xen_syms, as_json)
    lp.precheck_payload(file, name)  # before the backend is even opened
    res = _with_backend(args, lambda b: lp.upload(b, name, file, force=force))
    _emit(args, f"Uploading {file}... completed: {name} is CHECKED.", res.to_json(),
          "xsbuild.upload/1")


@cli.command("load", epilog=_EPILOG, help=_help(
    "Upload FILE and apply it; if the apply fails, unload it again.\n\n"
    "The payload is named after the file, as `xen-livepatch load` does: fix.livepatch -> fix.",
    "  xsbuild load fix.livepatch\n  xsbuild load fix.livepatch --retries 6 --name fix-v2"))
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--name", help="Payload name (default: FILE's basename without its extension).")
@click.option("--nodeps", is_flag=True, help="Apply without the .livepatch.depends check.")
@_FORCE
@_timing
@_common
def load_cmd(file: str, name: str | None, nodeps: bool, force: bool, backend: str,
             sim_state: str | None, sim_xen_syms: str | None, as_json: bool, timeout: str,
             retries: int, timeout_start: str, wait: float, verbose: bool) -> None:
    args = _args(backend, sim_state, sim_xen_syms, as_json)
    timing = TimingArgs(timeout, retries, timeout_start, wait, verbose)
    opts = timing.options(nodeps)
    name = check_name("--name", name)
    lp.precheck_payload(file, name or lp.name_from_path(file))
    _schedule(opts, timing)
    up, res = _with_backend(args, lambda b: lp.load(b, file, opts, name=name, force=force))
    text = f"Uploading {file}... completed.\n{_action_text(res)}"
    _emit(args, text, {"upload": up.to_json(), "apply": res.to_json()}, "xsbuild.load/1")


@cli.command("list", epilog=_EPILOG, help=_help(
    "List loaded payloads in upload order: name, state, last error, metadata.\n\n"
    "The table is that of `xen-livepatch list`; --json adds the hypervisor's build-id, its "
    "release and the sysctl interface version.",
    "  xsbuild list\n  xsbuild list --json | jq -r '.payloads[].name'"))
@_common
def list_cmd(backend: str, sim_state: str | None, sim_xen_syms: str | None,
             as_json: bool) -> None:
    args = _args(backend, sim_state, sim_xen_syms, as_json)

    def work(b: Backend) -> tuple[list[Any], dict[str, object]]:
        entries = lp.list_payloads(b)
        extra: dict[str, object] = {"backend": b.description,
                                    "interface_version": hex(b.interface_version())}
        if args.json:
            try:
                extra["build_id"] = b.build_id().hex()
            except HypercallError as exc:
                extra["build_id"] = None
                extra["build_id_error"] = f"-{xen_abi.errno_name(exc.errno_value)}"
            # the release whose loader rules apply (xen_versions.py); optional: absent when
            # XENVER is refused or the release is older than the rules know
            with contextlib.suppress(HypercallError, UsageError):
                extra["xen_version"] = str(b.xen_version())
        return entries, extra

    entries, extra = _with_backend(args, work)
    _emit(args, lp.format_list(entries),
          {**extra, "payloads": [lp.entry_to_json(e) for e in entries]}, "xsbuild.list/1")
