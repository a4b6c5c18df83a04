"""What the integration tests measure and print after the run (``pytest_terminal_summary``
in conftest.py): the container image's size and build time."""

from __future__ import annotations

from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class ImageReport:
    """What ``test_image.py`` measured of the container image."""

    size: int  # bytes, uncompressed, as dockerd reports it
    build_seconds: float  # docker build, base imported
    base_seconds: float  # mmdebstrap (0 when REGISTRY_PROXY_TEST_BASE_ROOTFS was given)


IMAGE_REPORT = pytest.StashKey[ImageReport]()
