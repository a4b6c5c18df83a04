"""The reliability suite's fixtures: the integration tests' own (real docker-registry,
fault proxy, skopeo, tmpfs...), imported here by name so both suites share one rig."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.conftest import (  # noqa: F401  (fixtures, used by name)
    fault_proxy,
    http,
    lying_upstream,
    passthrough,
    proxy_factory,
    registry,
    skopeo,
    tmpfs,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.integration)
