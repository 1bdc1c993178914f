"""The differ's pure helpers (xsbuild.diff.model) and its kinds."""

from __future__ import annotations

import json

import pytest

from xsbuild.diff.model import (
    ChangeKind,
    Outcome,
    Status,
    cold_parent_name,
    demangle,
    is_init_section,
    is_special_static,
    xen_name,
)
from xsbuild.elf import STB_GLOBAL, STB_LOCAL, Symbol


@pytest.mark.parametrize(("name", "parent"), [
    ("foo.cold", "foo"), ("foo.cold.3", "foo"), ("foo.part.0.cold", "foo.part.0"),
    ("foo", None), ("cold", None), ("foo.coldness", None),
])
def test_cold_parent_name(name: str, parent: str | None) -> None:
    assert cold_parent_name(name) == parent


def test_demangle_masks_every_number() -> None:
    assert demangle("foo.constprop.3") == "foo.constprop.#"
    assert demangle("count.12") == "count.#"
    assert demangle("foo.isra.0.cold.1") == "foo.isra.#.cold.#"
    assert demangle("plain") == "plain"


def test_sections_and_specials() -> None:
    assert is_init_section(".init.text") and is_init_section(".initcall7.init")
    assert is_init_section(".exit.text") and not is_init_section(".text.init_foo")
    assert is_special_static("__func__.3") and is_special_static("CSWTCH.12")
    assert not is_special_static("count.3")


def test_xen_name_of_statics_and_globals() -> None:
    static = Symbol(name="helper", bind=STB_LOCAL, file="common/x.c")
    glob = Symbol(name="helper", bind=STB_GLOBAL, file="")
    assert xen_name(static) == "common/x.c#helper"
    assert xen_name(glob) == "helper"


def test_kinds_are_strings_in_json() -> None:
    doc = {"s": Status.CHANGED, "c": ChangeKind.RELOCATION, "o": Outcome.NO_CHANGE}
    assert json.loads(json.dumps(doc)) == {"s": "changed", "c": "relocation", "o": "no-change"}
    assert Status.SAME == "same"
