"""Typed errors pickle with their fields, so worker processes can return them."""

from __future__ import annotations

import pickle

from xsbuild.errors import HypercallError, HypervisorBusy, UnsupportedChangeError


def test_unsupported_change_error_pickles_with_its_problems() -> None:
    exc = UnsupportedChangeError(["a.o: .data: x: changed data", "b.o: .init.text: y"])
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is UnsupportedChangeError
    assert back.problems == exc.problems and str(back) == str(exc)
    assert back.return_code == 1


def test_hypercall_errors_pickle_with_their_errno() -> None:
    for cls in (HypercallError, HypervisorBusy):
        back = pickle.loads(pickle.dumps(cls("LIVEPATCH_ACTION apply: -EBUSY", 16)))
        assert type(back) is cls and back.errno_value == 16
        assert str(back) == "LIVEPATCH_ACTION apply: -EBUSY"
