"""The one exception hierarchy of xsbuild, and the exit code each class maps to.

Library code raises these; only :mod:`xsbuild.cli` turns them into one line on stderr and an exit
code.  The codes are documented in the README ("Exit codes") and in ``xsbuild --help``.
"""

from __future__ import annotations

# Exit codes, shared by every command.
EXIT_OK = 0  # success (for ``diff``: changes were found)
EXIT_REFUSED = 1  # refused: an unpatchable change, a payload Xen would reject, a hypervisor error
EXIT_BAD_INPUT = 2  # bad input or usage: not an ELF, wrong machine, missing file, bad option
EXIT_NO_CHANGE = 3  # ``diff``/``build``: no functional change between the two objects
EXIT_BUSY = 4  # the hypervisor is busy (EBUSY/EAGAIN): the same command may succeed if retried
EXIT_REPLAY = 5  # ``build``: xsbuild cannot reproduce one of the tree's objects (its limitation)
EXIT_INTERNAL = 70  # a bug in xsbuild (EX_SOFTWARE); the message says so


class XsbuildError(Exception):
    """Base class: a failure that the CLI reports as one line with :attr:`return_code`.

    Every class pickles with its fields (``problems``, ``errno_value``), so a worker process can
    hand the exception itself back to its parent.
    """

    return_code = EXIT_INTERNAL


class UsageError(XsbuildError):
    """Bad arguments or an input file that is missing, unreadable or of the wrong kind."""

    return_code = EXIT_BAD_INPUT


class ForceUnsupportedError(UsageError):
    """``--force`` against a hypervisor older than 4.19, whose livepatch op has no flags field."""


class ElfParseError(UsageError):
    """An input is not an ELF object xsbuild can read (truncated, wrong class or machine, ...)."""


class InputMismatchError(UsageError):
    """Two inputs that must belong together do not (different translation units, ...)."""


class UnsupportedChangeError(XsbuildError):
    """The change cannot be live-patched (changed data, ``__init`` code, ...).

    Holds every problem found, so the user sees all of them in one run.
    """

    return_code = EXIT_REFUSED

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = self.problems[0]
        else:
            text = f"{len(self.problems)} unsupported changes:\n  " + "\n  ".join(self.problems)
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.problems,))


class ReplayError(XsbuildError):
    """Replaying the tree's build lines did not reproduce one of its objects, and nothing shows
    the tree is at fault (stale, or another compiler): a limitation of xsbuild.

    Holds one line per object, naming the object and the step whose output differs.
    """

    return_code = EXIT_REPLAY

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        head = ("xsbuild cannot reproduce the tree's build of "
                f"{len(self.problems)} object(s) (a limitation of xsbuild, please report it)")
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


class NoChangeError(XsbuildError):
    """The objects differ in no function, data or hook that a payload would carry."""

    return_code = EXIT_NO_CHANGE


class RelocationError(XsbuildError):
    """A relocation the hypervisor's loader would reject, or a symbol that cannot be resolved."""

    return_code = EXIT_REFUSED


class PayloadRejected(XsbuildError):
    """``check`` found problems: the hypervisor would refuse this payload."""

    return_code = EXIT_REFUSED


class HypercallError(XsbuildError):
    """The hypervisor answered a livepatch operation with an error."""

    return_code = EXIT_REFUSED

    def __init__(self, message: str, errno_value: int = 0) -> None:
        super().__init__(message)
        self.errno_value = errno_value

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self), self.errno_value))


class HypervisorBusy(HypercallError):
    """EBUSY/EAGAIN: the rendezvous timed out or other work is pending; retrying may succeed."""

    return_code = EXIT_BUSY
