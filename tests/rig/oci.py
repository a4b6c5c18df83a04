"""OCI media types and documents, and image layouts generated in pure Python with random
content so digests are fresh.

:func:`image_config` and :func:`image_manifest` are the one place an image's config and
manifest JSON are written (bench's streamed images use them too). A generated image is an
OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/<hex>``) that
``skopeo copy oci:DIR:TAG ...`` can push. Layers are gzip'd tar files holding one file of
random bytes, so every call yields new layer digests, new diff_ids, a new config and a new
manifest digest.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)
ACCEPT_ALL_MANIFESTS = ", ".join(MANIFEST_MEDIA_TYPES)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
DEFAULT_LAYER_SIZE = 4096


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(value: Any) -> bytes:
    """The JSON bytes we store and push: compact and key-sorted, so digests are stable."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str

    def to_json(self) -> dict[str, str]:
        return {"os": self.os, "architecture": self.architecture}


@dataclass(frozen=True)
class OciImage:
    """One single-platform image: its manifest, config and layers (all in ``layout``)."""

    layout: Path
    tag: str
    platform: Platform
    manifest: Blob
    manifest_bytes: bytes
    config: Blob
    layers: tuple[Blob, ...]
    diff_ids: tuple[str, ...]

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def oci_ref(self) -> str:
        """The skopeo source for this image: ``oci:DIR:TAG``."""
        return f"oci:{self.layout}:{self.tag}"


@dataclass(frozen=True)
class OciIndex:
    """A multi-platform image: an OCI index referencing one manifest per platform."""

    layout: Path
    tag: str
    index: Blob
    index_bytes: bytes
    images: tuple[OciImage, ...]

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    def image_for(self, architecture: str) -> OciImage:
        for image in self.images:
            if image.platform.architecture == architecture:
                return image
        raise KeyError(architecture)

    @property
    def layer_digests(self) -> list[str]:
        return [d for image in self.images for d in image.layer_digests]


class OciLayout:
    """An OCI image layout directory being written: blobs plus the tagged ``index.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (path / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
        self._refs: list[dict[str, Any]] = []
        self._write_index()

    def add_blob(self, data: bytes, media_type: str) -> Blob:
        digest = sha256_digest(data)
        blob_path = self.path / "blobs" / "sha256" / digest.removeprefix("sha256:")
        if not blob_path.exists():
            blob_path.write_bytes(data)
        return Blob(digest=digest, size=len(data), media_type=media_type)

    def tag(self, blob: Blob, tag: str, platform: Platform | None = None) -> None:
        ref = blob.descriptor()
        ref["annotations"] = {REF_NAME_ANNOTATION: tag}
        if platform is not None:
            ref["platform"] = platform.to_json()
        self._refs = [r for r in self._refs if r["annotations"][REF_NAME_ANNOTATION] != tag]
        self._refs.append(ref)
        self._write_index()

    def _write_index(self) -> None:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": self._refs}
        (self.path / "index.json").write_text(json.dumps(index, indent=2))


def image_config(
    platform: Platform, diff_ids: Sequence[str], *, created_by: str = "registry-proxy tests"
) -> bytes:
    """An image config (canonical JSON) for layers with these diff_ids."""
    config = {
        "architecture": platform.architecture,
        "os": platform.os,
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": created_by}] * len(diff_ids),
    }
    return canonical_json(config)


def image_manifest(config: Blob, layers: Sequence[Blob]) -> bytes:
    """An OCI image manifest (canonical JSON) for this config and these layers."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [blob.descriptor() for blob in layers],
    }
    return canonical_json(manifest)


def random_layer(size: int = DEFAULT_LAYER_SIZE) -> tuple[bytes, str]:
    """A gzip'd tar holding one file of ``size`` random bytes; returns (blob, diff_id)."""
    content = os.urandom(size)
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name=f"data-{content[:4].hex()}.bin")
        info.size = len(content)
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(content))
    tar_bytes = tar_buffer.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256_digest(tar_bytes)


def write_image(
    layout: OciLayout,
    tag: str,
    *,
    layers: int = 2,
    layer_size: int = DEFAULT_LAYER_SIZE,
    platform: Platform = Platform("linux", "amd64"),
) -> OciImage:
    """Write config, layers and manifest blobs into ``layout``; the manifest is not tagged
    (``tag`` is what the returned image will be pulled by)."""
    layer_blobs: list[Blob] = []
    diff_ids: list[str] = []
    for _ in range(layers):
        data, diff_id = random_layer(layer_size)
        layer_blobs.append(layout.add_blob(data, OCI_LAYER_GZIP))
        diff_ids.append(diff_id)
    config_blob = layout.add_blob(image_config(platform, diff_ids), OCI_CONFIG)
    manifest_bytes = image_manifest(config_blob, layer_blobs)
    return OciImage(
        layout=layout.path,
        tag=tag,
        platform=platform,
        manifest=layout.add_blob(manifest_bytes, OCI_MANIFEST),
        manifest_bytes=manifest_bytes,
        config=config_blob,
        layers=tuple(layer_blobs),
        diff_ids=tuple(diff_ids),
    )


def make_image(
    path: Path,
    *,
    tag: str = "latest",
    layers: int = 2,
    layer_size: int = DEFAULT_LAYER_SIZE,
    platform: Platform = Platform("linux", "amd64"),
) -> OciImage:
    """Write a single-platform OCI image layout at ``path`` tagged ``tag``."""
    layout = OciLayout(path)
    image = write_image(layout, tag, layers=layers, layer_size=layer_size, platform=platform)
    layout.tag(image.manifest, tag)
    return image


DEFAULT_PLATFORMS = (Platform("linux", "amd64"), Platform("linux", "arm64"))


def make_index(
    path: Path,
    *,
    tag: str = "latest",
    layers: int = 2,
    layer_size: int = DEFAULT_LAYER_SIZE,
    platforms: tuple[Platform, ...] = DEFAULT_PLATFORMS,
) -> OciIndex:
    """Write a multi-platform OCI image layout: an OCI index tagged ``tag`` that references
    one image manifest per platform (each with its own random layers)."""
    layout = OciLayout(path)
    images = [
        write_image(layout, tag, layers=layers, layer_size=layer_size, platform=platform)
        for platform in platforms
    ]
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {**image.manifest.descriptor(), "platform": image.platform.to_json()}
            for image in images
        ],
    }
    index_bytes = canonical_json(index)
    index_blob = layout.add_blob(index_bytes, OCI_INDEX)
    layout.tag(index_blob, tag)
    return OciIndex(
        layout=path, tag=tag, index=index_blob, index_bytes=index_bytes, images=tuple(images)
    )


def read_layout_manifest(path: Path, tag: str) -> tuple[str, str, dict[str, Any]]:
    """From a layout skopeo wrote: (digest, media type, parsed JSON) of the manifest or index
    tagged ``tag`` in its ``index.json``."""
    index = json.loads((path / "index.json").read_text())
    for ref in index["manifests"]:
        if ref.get("annotations", {}).get(REF_NAME_ANNOTATION) == tag:
            digest = ref["digest"]
            data = (path / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()
            return digest, ref["mediaType"], json.loads(data)
    raise KeyError(f"tag {tag!r} not in {path}/index.json")


def layout_layer_digests(path: Path, tag: str) -> list[str]:
    """The layer digests of the image tagged ``tag`` in a layout (all platforms for an index,
    in index order)."""
    _, media_type, doc = read_layout_manifest(path, tag)
    if media_type in (OCI_INDEX, DOCKER_MANIFEST_LIST):
        digests: list[str] = []
        for ref in doc["manifests"]:
            data = (path / "blobs" / "sha256" / ref["digest"].removeprefix("sha256:")).read_bytes()
            digests.extend(layer["digest"] for layer in json.loads(data)["layers"])
        return digests
    return [layer["digest"] for layer in doc["layers"]]


def layout_blob_digests(path: Path) -> set[str]:
    """Every blob present in a layout, verified: the file's sha256 must equal its name."""
    found: set[str] = set()
    for blob_path in (path / "blobs" / "sha256").iterdir():
        digest = sha256_digest(blob_path.read_bytes())
        if digest != "sha256:" + blob_path.name:
            raise AssertionError(f"{blob_path} holds {digest}")
        found.add(digest)
    return found
