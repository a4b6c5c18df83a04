"""``registry-proxy cache ...`` on a stopped proxy's directory, in process: what each
command prints and its exit status."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.__main__ import main
from proxy.interfaces import TagEntry
from proxy.model import Digest
from proxy.pullthrough.registry import PullThroughRegistry
from proxy.settings import Settings

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def fill(cache: Path) -> tuple[Digest, Digest]:
    """One image (a manifest over one layer) tagged ``up/app:v1``, as a pull leaves it."""
    settings = Settings.from_mapping({"cache": {"dir": str(cache)}}, environ={})
    registry = PullThroughRegistry(settings)
    await registry.open(exclusive=True)
    try:
        layer_bytes = b"a layer" * 100
        layer = Digest.of(layer_bytes)
        await registry.store.put(layer, layer_bytes)
        body = json.dumps({"mediaType": OCI_MANIFEST, "layers": [{"digest": str(layer)}]}).encode()
        manifest = Digest.of(body)
        await registry.manifest_store.put(manifest, OCI_MANIFEST, body)
        await registry.tags.set("up", "app", "v1", TagEntry(manifest, OCI_MANIFEST, len(body), 1.0))
        registry.index.times.pulled("up", "app", manifest)
    finally:
        await registry.close()
    return manifest, layer


def test_ls_stats_evict_and_gc_on_a_stopped_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest, layer = asyncio.run(fill(tmp_path))
    where = ["--cache-dir", str(tmp_path)]

    assert main(["cache", "ls", *where, "--json"]) == 0
    (image,) = json.loads(capsys.readouterr().out)["images"]
    assert image["names"] == ["up/app:v1"] and image["digest"] == str(manifest)
    assert image["present"] == image["referenced"] == 2 and not image["pinned"]

    assert main(["cache", "stats", *where]) == 0
    out = capsys.readouterr().out
    assert "images        1" in out and "up/app" in out

    assert main(["cache", "gc", "--dry-run", *where]) == 0
    assert "would remove 0 temp files, 0 unreferenced blobs" in capsys.readouterr().out

    assert main(["cache", "evict", "up/other:*", *where]) == 0
    assert "removed 0 images" in capsys.readouterr().out
    assert main(["cache", "evict", "up/app:*", *where]) == 0
    assert "removed 1 images" in capsys.readouterr().out
    assert not (tmp_path / "blobs" / "sha256" / layer.hex[:2] / layer.hex).exists()
    assert main(["cache", "ls", *where, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == []

    assert main(["cache", "verify", *where]) == 0
    assert "checked 0 blobs: 0 corrupt" in capsys.readouterr().out


def test_the_progress_view_draws_bars_and_reports_each_image(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from proxy.operator import ProgressView

    refs = ["up/app:v1", "up/gone:v1"]
    with ProgressView(refs, bars=True) as view:
        view.event({"event": "image", "name": refs[0], "total": 2048, "blobs": 2})
        view.event({"event": "progress", "name": refs[0], "done": 1024})
        view.event({"event": "done", "name": refs[0], "error": None, "bytes": 2048})
        view.event({"event": "done", "name": refs[1], "error": "MANIFEST_UNKNOWN: no", "bytes": 0})
        overall = view._progress.tasks[0]
        assert overall.completed == 2 and overall.total == 2
        image = view._progress.tasks[1]
        assert image.completed == image.total == 2048
    out = capsys.readouterr().out
    assert "up/app:v1: ok" in out and "up/gone:v1: failed: MANIFEST_UNKNOWN: no" in out
