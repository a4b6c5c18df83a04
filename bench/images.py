"""Fresh images made of random bytes, pushed straight into the upstream's HTTP API.

Each layer is an uncompressed tar (``application/vnd.oci.image.layer.v1.tar``) holding one
file of random bytes, generated and hashed while it streams into a chunked upload
(``POST`` + ``PATCH`` + ``PUT ?digest=``), so nothing the size of a layer is ever held in
memory or written to a scratch file; that is far quicker than skopeo for 1 GiB. The
config and manifest are OCI (``PUT /v2/<repo>/manifests/<tag>``). The layer's diff_id is
its digest, as it is uncompressed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
CHUNK = 1 << 20
TAR_BLOCK = 512
MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class BlobRef:
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True, slots=True)
class Image:
    repo: str
    tag: str
    manifest_digest: str
    manifest_size: int
    config: BlobRef
    layers: tuple[BlobRef, ...]

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"

    @property
    def blobs(self) -> tuple[BlobRef, ...]:
        return (self.config, *self.layers)

    @property
    def size(self) -> int:
        """Bytes a full pull transfers: manifest, config and layers."""
        return self.manifest_size + sum(b.size for b in self.blobs)


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


async def _random_tar(size: int, hasher: hashlib._Hash, name: str) -> AsyncIterator[bytes]:
    """An uncompressed tar of exactly ``size`` bytes: header, random data, end blocks."""
    data_size = size - 3 * TAR_BLOCK
    if data_size < 0 or size % TAR_BLOCK:
        raise ValueError(f"layer size must be a multiple of {TAR_BLOCK} and >= {3 * TAR_BLOCK}")
    info = tarfile.TarInfo(name)
    info.size = data_size
    info.mode = 0o644
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    hasher.update(header)
    yield header
    left = data_size
    while left:
        chunk = os.urandom(min(CHUNK, left))
        left -= len(chunk)
        hasher.update(chunk)
        yield chunk
    trailer = bytes(2 * TAR_BLOCK)
    hasher.update(trailer)
    yield trailer


class Pusher:
    """Pushes blobs and manifests to a registry (the upstream) over its HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._base = base_url.rstrip("/")

    async def _start_upload(self, repo: str) -> str:
        async with self._session.post(f"{self._base}/v2/{repo}/blobs/uploads/") as response:
            if response.status != 202:
                raise RuntimeError(f"upload start: {response.status} {await response.text()}")
            return urljoin(self._base + "/", response.headers["Location"])

    async def _finish(self, location: str, digest: str) -> None:
        sep = "&" if "?" in location else "?"
        async with self._session.put(
            f"{location}{sep}digest={digest}", headers={"Content-Length": "0"}
        ) as response:
            if response.status != 201:
                raise RuntimeError(f"upload finish: {response.status} {await response.text()}")

    async def push_bytes(self, repo: str, data: bytes, media_type: str) -> BlobRef:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        location = await self._start_upload(repo)
        sep = "&" if "?" in location else "?"
        async with self._session.put(
            f"{location}{sep}digest={digest}",
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as response:
            if response.status != 201:
                raise RuntimeError(f"blob put: {response.status} {await response.text()}")
        return BlobRef(digest, len(data), media_type)

    async def push_random_layer(self, repo: str, size: int) -> BlobRef:
        """Stream a random tar layer of ``size`` bytes into a chunked upload."""
        hasher = hashlib.sha256()
        location = await self._start_upload(repo)
        body = _random_tar(size, hasher, f"data-{os.urandom(6).hex()}.bin")
        async with self._session.patch(
            location, data=body, headers={"Content-Type": "application/octet-stream"}
        ) as response:
            if response.status != 202:
                raise RuntimeError(f"upload patch: {response.status} {await response.text()}")
            location = urljoin(self._base + "/", response.headers["Location"])
        digest = "sha256:" + hasher.hexdigest()
        await self._finish(location, digest)
        return BlobRef(digest, size, OCI_LAYER_TAR)

    async def push_image(self, repo: str, tag: str, layer_sizes: list[int]) -> Image:
        layers = [await self.push_random_layer(repo, size) for size in layer_sizes]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": "2024-01-01T00:00:00Z",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer.digest for layer in layers]},
            "history": [{"created_by": "registry-proxy bench"} for _ in layers],
        }
        config_ref = await self.push_bytes(repo, canonical_json(config), OCI_CONFIG)
        manifest = canonical_json(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": config_ref.descriptor(),
                "layers": [layer.descriptor() for layer in layers],
            }
        )
        async with self._session.put(
            f"{self._base}/v2/{repo}/manifests/{tag}",
            data=manifest,
            headers={"Content-Type": OCI_MANIFEST},
        ) as response:
            if response.status != 201:
                raise RuntimeError(f"manifest put: {response.status} {await response.text()}")
        digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
        return Image(repo, tag, digest, len(manifest), config_ref, tuple(layers))


def mib(n: float) -> int:
    """``n`` MiB rounded to whole tar blocks."""
    return max(3 * TAR_BLOCK, int(n * MiB) // TAR_BLOCK * TAR_BLOCK)
