"""How xsbuild rebuilds a tree that its owner built the ordinary way (xsbuild/debian.py).

Such a tree's ``compile.h`` records the build's date, time, user, domain and host; make would
put today's into ``common/version.o`` unless the same values come back as make variables.  A
copy of the tree (``prove``'s private copy) must also name the original's path in its debug
info.  The end-to-end proof on a real upstream tree is ``tests/xen/test_upstream_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from xsbuild.debian import compile_identity, make_recipe

COMPILE_H = """\
#define XEN_COMPILE_DATE\t"Thu Dec  3 07:51:47 UTC 2026"
#define XEN_COMPILE_TIME\t"07:51:47"
#define XEN_COMPILE_BY\t\t"alice"
#define XEN_COMPILE_DOMAIN\t"example.org"
#define XEN_COMPILE_HOST\t"builder-7"
#define XEN_COMPILER\t\t"gcc (Debian 12.2.0-14+deb12u1) 12.2.0"
"""


def _tree(top: Path, compile_h: str | None) -> Path:
    (top / "xen" / "include" / "xen").mkdir(parents=True)
    if compile_h is not None:
        (top / "xen" / "include" / "xen" / "compile.h").write_text(compile_h)
    return top


def test_a_built_tree_is_rebuilt_with_its_own_identity(tmp_path: Path) -> None:
    top = _tree(tmp_path / "tree", COMPILE_H)
    assert compile_identity(top) == {
        "XEN_BUILD_DATE": "Thu Dec  3 07:51:47 UTC 2026", "XEN_BUILD_TIME": "07:51:47",
        "XEN_WHOAMI": "alice", "XEN_DOMAIN": "example.org", "XEN_BUILD_HOST": "builder-7"}
    recipe = make_recipe(top)
    assert recipe.env["XEN_BUILD_DATE"] == "Thu Dec  3 07:51:47 UTC 2026"
    assert recipe.env["XEN_BUILD_HOST"] == "builder-7" and recipe.args == ()


def test_a_copy_names_the_original_path_in_its_debug_info(tmp_path: Path) -> None:
    original = _tree(tmp_path / "original", COMPILE_H)
    copy = _tree(tmp_path / "copy", COMPILE_H)
    recipe = make_recipe(copy, built_at=original)
    assert recipe.args == (f"EXTRA_CFLAGS_XEN_CORE=-fdebug-prefix-map={copy}={original}",)
    assert make_recipe(original, built_at=original).args == ()


def test_an_unbuilt_or_partial_tree_gets_pinned_dates(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("SOURCE_DATE_EPOCH", "XEN_BUILD_HOST", "XEN_WHOAMI"):
        monkeypatch.delenv(var, raising=False)
    for name, text in (("unbuilt", None),
                       ("partial", '#define XEN_COMPILE_DATE\t"Thu Dec  3 07:51:47 UTC 2026"\n')):
        top = _tree(tmp_path / name, text)
        assert compile_identity(top) is None
        env = make_recipe(top).env
        assert env["XEN_BUILD_DATE"] == "Thu Jan  1 00:00:00 UTC 1970", env["XEN_BUILD_DATE"]
        assert "XEN_BUILD_HOST" not in env
