"""The one check behind every option that takes a value from a fixed set."""

from __future__ import annotations

from collections.abc import Iterable


def check_choice(name: str, value, valid: Iterable) -> None:
    """Raise ValueError naming the option, the bad value and every valid one."""
    valid = tuple(valid)
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(repr, valid))}")
