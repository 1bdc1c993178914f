"""Fixtures of the real-Xen suite: the Debian tree, the dom0 Python bundle, a logging boot.

A host without QEMU or the shared harness skips these tests with the reason (``.ci/xen-e2e.sh``
installs what they need); with ``XSBUILD_REQUIRE_XEN=1`` (CI) the same condition fails them, so a
broken CI machine cannot pass silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from .dom0py import Dom0Python, get_dom0_python
from .qemu import BootResult, QemuUnavailable, Script, boot, check_host

REQUIRE_ENV = "XSBUILD_REQUIRE_XEN"

BootFn = Callable[..., BootResult]


def _unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{reason} ({REQUIRE_ENV} is set)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def qemu_host() -> None:
    """QEMU and boot-xen.sh are present (else skip, or fail under XSBUILD_REQUIRE_XEN)."""
    try:
        check_host()
    except QemuUnavailable as exc:
        _unavailable(str(exc))


@pytest.fixture(scope="session")
def dom0_python() -> Dom0Python:
    return get_dom0_python()


def logged_boot(logs: Path, cmds: str | Script, files: Mapping[Path, str] | None = None,
                **kwargs: object) -> BootResult:
    """:func:`tests.xen.qemu.boot`, its logs saved in ``logs``; dom0 must finish the commands."""
    result = boot(cmds, files, **kwargs)  # type: ignore[arg-type]
    result.save(logs)
    assert result.booted, f"dom0 did not finish its commands\n{result.describe()}"
    return result


@pytest.fixture
def xen_boot(qemu_host: None, tmp_path: Path) -> BootFn:
    """:func:`logged_boot`, saving each boot's logs under the test's tmp_path."""
    count = 0

    def run(cmds: str | Script, files: Mapping[Path, str] | None = None,
            **kwargs: object) -> BootResult:
        nonlocal count
        count += 1
        return logged_boot(tmp_path / f"boot-{count}", cmds, files, **kwargs)

    return run
