"""Which server binaries the integration tests may use: a missing one skips the test,
or fails it when CI=true (CI must never pass by skipping)."""

from __future__ import annotations

import os

import pytest

from tests.rig.process import find_binary


def binary_or_skip(path: str) -> str:
    """``path`` (or its name on PATH) if executable; otherwise skip the test, or fail it
    when CI=true."""
    found = find_binary(path)
    if found is not None:
        return found
    message = f"{path} is not installed"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: a missing binary is a failure)")
    pytest.skip(message)
