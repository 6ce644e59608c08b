"""`tests._peers.require`: a missing peer skips on a developer's machine and fails under CI."""

from __future__ import annotations

import pytest

from tests._peers import require

MISSING = "opticam_no_such_peer"


def test_a_missing_peer_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(MISSING)


@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_a_missing_peer_fails_under_ci(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match=MISSING):
        require(MISSING)


def test_a_present_peer_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("json").dumps([1]) == "[1]"
