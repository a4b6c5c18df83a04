"""Fresh images made of random bytes, pushed straight into the upstream's HTTP API.

Each layer is an uncompressed tar (``application/vnd.oci.image.layer.v1.tar``) holding one
file of random bytes, generated while it streams into a chunked upload
(``tests.rig.distribution.push_stream``: POST, PATCH, PUT ``?digest=``, hashed on the way),
so nothing the size of a layer is ever held in memory or written to a scratch file; that
is far quicker than skopeo for 1 GiB. The config and manifest are the rig's OCI documents
(``tests.rig.oci``). The layer's diff_id is its digest, as it is uncompressed.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from tests.rig import oci
from tests.rig.distribution import push_blob, push_stream, put_manifest

CHUNK = 1 << 20
TAR_BLOCK = 512
MiB = 1 << 20
PLATFORM = oci.Platform("linux", "amd64")


@dataclass(frozen=True, slots=True)
class Image:
    repo: str
    tag: str
    manifest_digest: str
    manifest_size: int
    config: oci.Blob
    layers: tuple[oci.Blob, ...]

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"

    @property
    def blobs(self) -> tuple[oci.Blob, ...]:
        return (self.config, *self.layers)

    @property
    def size(self) -> int:
        """Bytes a full pull transfers: manifest, config and layers."""
        return self.manifest_size + sum(b.size for b in self.blobs)


async def random_tar(size: int, name: str) -> AsyncIterator[bytes]:
    """An uncompressed tar of exactly ``size`` bytes: header, random data, end blocks."""
    data_size = size - 3 * TAR_BLOCK
    if data_size < 0 or size % TAR_BLOCK:
        raise ValueError(f"layer size must be a multiple of {TAR_BLOCK} and >= {3 * TAR_BLOCK}")
    info = tarfile.TarInfo(name)
    info.size = data_size
    info.mode = 0o644
    yield info.tobuf(format=tarfile.USTAR_FORMAT)
    left = data_size
    while left:
        chunk = os.urandom(min(CHUNK, left))
        left -= len(chunk)
        yield chunk
    yield bytes(2 * TAR_BLOCK)


class Pusher:
    """Pushes fresh random images to a registry (the upstream) over its HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    async def push_random_layer(self, repo: str, size: int) -> oci.Blob:
        """Stream a random tar layer of ``size`` bytes into a chunked upload."""
        body = random_tar(size, f"data-{os.urandom(6).hex()}.bin")
        digest, pushed = await push_stream(self._session, self._base, repo, body)
        assert pushed == size, (pushed, size)
        return oci.Blob(digest, size, oci.OCI_LAYER_TAR)

    async def push_image(self, repo: str, tag: str, layer_sizes: list[int]) -> Image:
        layers = [await self.push_random_layer(repo, size) for size in layer_sizes]
        config = oci.image_config(
            PLATFORM, [layer.digest for layer in layers], created_by="registry-proxy bench"
        )
        config_digest = await push_blob(self._session, self._base, repo, config)
        config_blob = oci.Blob(config_digest, len(config), oci.OCI_CONFIG)
        manifest = oci.image_manifest(config_blob, layers)
        digest = await put_manifest(
            self._session, self._base, repo, tag, manifest, oci.OCI_MANIFEST
        )
        return Image(repo, tag, digest, len(manifest), config_blob, tuple(layers))


def mib(n: float) -> int:
    """``n`` MiB rounded to whole tar blocks."""
    return max(3 * TAR_BLOCK, int(n * MiB) // TAR_BLOCK * TAR_BLOCK)
