"""Behaviour unchanged on Debian's tree: e2e patches of ``tests/xen/patches/`` (one of each
kind) built by ``xsbuild build`` with the code of :data:`tests.support.baseline.BASE_COMMIT` and
with the current code give the same payloads (or the same refusal).  Needs the Debian tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.baseline import (
    BASE_COMMIT,
    REPO,
    baseline_checkout,
    baseline_missing,
    without_copy_names,
    xsbuild_at,
)

from .debian_tree import DebianTree
from .test_build_e2e import PATCHES, header_args

pytestmark = pytest.mark.slow

# One patch of each kind (the fast twin covers every fixture scenario): a changed function, one
# stacked on it, new function and data, bug frames, a header inline in two objects, a refusal,
# a const table, an assembly function.
STEMS = ("01", "02", "04", "09", "11", "13", "16", "17")


def _build(code: Path, tree: DebianTree, patch: Path, out: Path,
           *extra: str) -> tuple[int, bytes, str, str]:
    """(exit code, payload bytes, build-id from the JSON summary, stderr) of one build."""
    proc = xsbuild_at(code, "build", "--srcdir", tree.source_top, "--patch", patch, "--xen-syms",
                      tree.debian_xen_syms, "-o", out, "--json", "-j", "2", *header_args(patch),
                      *extra, timeout=900)
    summary = json.loads(proc.stdout) if proc.stdout.strip() else {}
    return (proc.returncode, out.read_bytes() if out.exists() else b"",
            str(summary.get("build_id", "")), proc.stderr.decode(errors="replace"))


def test_e2e_payloads_unchanged(debian_tree: DebianTree, tmp_path: Path) -> None:
    reason = baseline_missing()
    if reason:
        pytest.skip(f"behaviour-unchanged guard: {reason}")
    base = baseline_checkout(tmp_path / "baseline")
    for side in ("base", "head"):
        (tmp_path / side).mkdir()
    results: dict[str, dict[str, tuple[int, bytes, str, str]]] = {"base": {}, "head": {}}
    for stem in STEMS:
        [patch] = PATCHES.glob(f"{stem}-*.patch")
        if not (base / "tests" / "xen" / "patches" / patch.name).is_file():
            continue  # newer than the base: it tests new behaviour (a refused layout change)
        for side, code in (("base", base), ("head", REPO)):
            extra: list[str] = []
            if stem == "02":  # stacked on 01, as the e2e test builds it
                extra = ["--depends", results[side]["01"][2]]
            results[side][stem] = _build(code, debian_tree, patch,
                                         tmp_path / side / f"{stem}.livepatch", *extra)
        rc0, data0, _, _ = results["base"][stem]
        rc1, data1, _, err1 = results["head"][stem]
        assert rc1 == rc0, f"{patch.name}: exit {rc1}, base {BASE_COMMIT} exit {rc0}\n{err1}"
        if data1 and data0:  # the one intended change: copies are named per payload
            assert without_copy_names(data1) == without_copy_names(data0), \
                f"{patch.name}: payload differs from base {BASE_COMMIT}"
        else:
            assert data1 == data0, f"{patch.name}: payload differs from base {BASE_COMMIT}"
