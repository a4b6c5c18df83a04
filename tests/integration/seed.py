"""Seed the upstream with generated images over the distribution API (no skopeo): faster
than ``skopeo copy`` when a test only needs an image to exist upstream."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from . import oci
from .registry_client import push_blob, put_manifest


async def push_image(
    http: aiohttp.ClientSession,
    registry_url: str,
    workdir: Path,
    repo: str,
    tag: str,
    *,
    layers: int = 1,
    layer_size: int = oci.DEFAULT_LAYER_SIZE,
) -> oci.OciImage:
    """Generate a fresh OCI image in ``workdir`` and push its blobs and manifest (tagged
    ``tag``) into ``repo``; returns the image (digests, sizes, manifest bytes)."""
    image = oci.make_image(workdir, tag=tag, layers=layers, layer_size=layer_size)
    await push_existing(http, registry_url, image, repo, tag)
    return image


async def push_existing(
    http: aiohttp.ClientSession, registry_url: str, image: oci.OciImage, repo: str, tag: str
) -> None:
    """Push an already generated image (the same bytes, so the same digests) to ``repo``."""
    blobs = image.layout / "blobs" / "sha256"
    for blob in (image.config, *image.layers):
        data = (blobs / blob.digest.removeprefix("sha256:")).read_bytes()
        await push_blob(http, registry_url, repo, data)
    digest = await put_manifest(
        http, registry_url, repo, tag, image.manifest_bytes, oci.OCI_MANIFEST
    )
    assert digest == image.manifest.digest
