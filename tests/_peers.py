"""Peer libraries the parity tests compare against (TorchRay, Quantus, pytorch-grad-cam, TorchCAM,
scikit-image's photos). A developer without them gets a skip; CI (``CI=true``) installs them all,
so there a missing one is an installation defect and fails instead of silently passing."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require(module: str) -> ModuleType:
    """``module`` imported; a skip when it is missing, a failure when running in CI."""
    if not in_ci():
        return pytest.importorskip(module)
    try:
        return importlib.import_module(module)
    except ImportError as err:
        pytest.fail(f"{module} is required under CI=true (see the Makefile's peers): {err}", pytrace=False)
