"""DiskBlobStore: verify-then-rename ingest, reads, start-up clean-up."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from proxy.errors import BlobUnknown, CacheWriteFailed, DigestMismatch, TooLarge
from proxy.model import Descriptor, Digest
from proxy.storage.disk import (
    BLOBS_DIR,
    IOV_MAX,
    PART_SUFFIX,
    TMP_DIR,
    WRITE_SLICE,
    DiskBlobStore,
    DiskBlobWriter,
    DiskDescriptorService,
)

DATA = b"layer bytes " * 1000
DIGEST = Digest.of(DATA)


@pytest.fixture
def store(tmp_path: Path) -> DiskBlobStore:
    store = DiskBlobStore(tmp_path / "cache")
    store.open_store()
    return store


def temp_files(store: DiskBlobStore) -> list[Path]:
    return sorted((store.root / TMP_DIR).iterdir())


def test_path_layout(store: DiskBlobStore) -> None:
    assert store.path(DIGEST) == (store.root / BLOBS_DIR / "sha256" / DIGEST.hex[:2] / DIGEST.hex)


async def test_create_write_commit_puts_the_file_in_place(store: DiskBlobStore) -> None:
    writer = await store.create(DIGEST)
    assert writer.temp_path.parent == store.root / TMP_DIR
    assert writer.temp_path.name.endswith(PART_SUFFIX)
    assert not store.path(DIGEST).exists()
    for start in range(0, len(DATA), 4096):
        await writer.write(DATA[start : start + 4096])
    assert writer.temp_path.read_bytes() == DATA

    descriptor = await writer.commit(Descriptor(DIGEST, len(DATA), "application/x-test"))

    assert descriptor == Descriptor(DIGEST, len(DATA), "application/x-test")
    assert store.path(DIGEST).read_bytes() == DATA
    assert temp_files(store) == []
    await writer.cancel()  # after commit: a no-op that must not remove the blob
    assert store.path(DIGEST).read_bytes() == DATA


async def test_writes_go_to_the_file_in_slices_and_survive_short_writes(
    store: DiskBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No write(2) carries more than WRITE_SLICE bytes (a 2 MiB write fills huge page-cache
    folios, several times dearer) nor more than IOV_MAX pieces; a short write goes on
    where it stopped. Both the pump's 2 MiB buffers and many small chunks."""
    big = os.urandom(2 * WRITE_SLICE + 12345)
    small = [os.urandom(100) for _ in range(IOV_MAX * 3)]
    data = big + b"".join(small) + big
    digest = Digest.of(data)
    writer = await store.create(digest, len(data))
    assert isinstance(writer, DiskBlobWriter)
    calls: list[tuple[int, int]] = []
    real_writev = os.writev

    def writev(fd: int, buffers: list[memoryview]) -> int:
        calls.append((sum(len(b) for b in buffers), len(buffers)))
        if len(calls) % 3 == 0:  # every third call is short: a third of its bytes
            return os.write(fd, b"".join(buffers)[: max(1, calls[-1][0] // 3)])
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)
    assert writer.write_blocking(memoryview(big)) is None
    writer.hash_blocking(memoryview(big))  # the pump hashes its buffers apart
    await writer.write(*small)
    assert writer.write_blocking(memoryview(big)) is None
    writer.hash_blocking(memoryview(big))
    monkeypatch.setattr(os, "writev", real_writev)

    assert max(size for size, _ in calls) == WRITE_SLICE
    assert max(pieces for _, pieces in calls) <= IOV_MAX
    assert writer.temp_path is not None and writer.temp_path.read_bytes() == data
    await writer.commit(Descriptor(digest, len(data), "application/x-test"))
    assert store.path(digest).read_bytes() == data


async def test_two_writers_of_one_digest_use_distinct_temp_files(store: DiskBlobStore) -> None:
    first = await store.create(DIGEST)
    second = await store.create(DIGEST)
    assert first.temp_path != second.temp_path
    await first.cancel()
    await second.cancel()
    assert temp_files(store) == []


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (b"other bytes", Descriptor(DIGEST, len(b"other bytes"))),  # wrong digest
        (DATA, Descriptor(DIGEST, len(DATA) + 1)),  # right digest, wrong size
        (DATA[:-1], Descriptor(DIGEST, len(DATA))),  # truncated
    ],
    ids=["digest", "size", "truncated"],
)
async def test_mismatch_commits_nothing(
    store: DiskBlobStore, written: bytes, expected: Descriptor
) -> None:
    writer = await store.create(DIGEST)
    await writer.write(written)

    with pytest.raises(DigestMismatch) as info:
        await writer.commit(expected)

    assert info.value.detail["expected"]["digest"] == str(DIGEST)
    assert not store.path(DIGEST).exists()
    await writer.cancel()  # what every caller does in its finally
    assert temp_files(store) == []
    with pytest.raises(BlobUnknown):
        await store.stat(DIGEST)


async def test_failed_commit_itself_removes_the_temp_file(store: DiskBlobStore) -> None:
    # BlobWriter.commit's contract: "Raises DigestMismatch (and removes the temp file)
    # when the bytes are wrong" -- without relying on a later cancel().
    writer = await store.create(DIGEST)
    await writer.write(b"wrong")
    with pytest.raises(DigestMismatch):
        await writer.commit(Descriptor(DIGEST, 5))
    try:
        assert temp_files(store) == []
    finally:
        await writer.cancel()


async def test_cancel_is_idempotent(store: DiskBlobStore) -> None:
    writer = await store.create(DIGEST)
    await writer.write(DATA)
    await writer.cancel()
    await writer.cancel()
    assert temp_files(store) == []
    assert not store.path(DIGEST).exists()


async def test_put_stores_small_blobs_and_verifies(store: DiskBlobStore) -> None:
    body = b'{"schemaVersion": 2}'
    digest = Digest.of(body)
    assert await store.put(digest, body) == Descriptor(digest, len(body))
    assert store.path(digest).read_bytes() == body

    with pytest.raises(DigestMismatch):
        await store.put(DIGEST, body)
    assert not store.path(DIGEST).exists()
    assert temp_files(store) == []


def test_open_store_removes_leftover_part_files(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    (root / TMP_DIR).mkdir(parents=True)
    leftover = root / TMP_DIR / f"{DIGEST.hex}.dead{PART_SUFFIX}"
    leftover.write_bytes(b"half a blob")
    committed = root / BLOBS_DIR / "sha256" / DIGEST.hex[:2] / DIGEST.hex
    committed.parent.mkdir(parents=True)
    committed.write_bytes(DATA)

    DiskBlobStore(root).open_store()

    assert not leftover.exists()
    assert committed.read_bytes() == DATA


def test_open_store_creates_directories(tmp_path: Path) -> None:
    DiskBlobStore(tmp_path / "new").open_store()
    assert (tmp_path / "new" / BLOBS_DIR).is_dir()
    assert (tmp_path / "new" / TMP_DIR).is_dir()


async def test_stat_and_read(store: DiskBlobStore) -> None:
    await store.put(DIGEST, DATA)
    assert await store.stat(DIGEST) == Descriptor(DIGEST, len(DATA))
    assert await store.read(DIGEST, len(DATA)) == DATA


async def test_read_over_limit_is_too_large(store: DiskBlobStore) -> None:
    await store.put(DIGEST, DATA)
    with pytest.raises(TooLarge):
        await store.read(DIGEST, len(DATA) - 1)


async def test_missing_blob_is_unknown(store: DiskBlobStore) -> None:
    with pytest.raises(BlobUnknown):
        await store.stat(DIGEST)
    with pytest.raises(BlobUnknown):
        await store.read(DIGEST, 1 << 20)


async def test_delete_is_idempotent(store: DiskBlobStore) -> None:
    await store.put(DIGEST, DATA)
    await store.delete(DIGEST)
    await store.delete(DIGEST)
    with pytest.raises(BlobUnknown):
        await store.stat(DIGEST)


async def test_disk_descriptor_service_reports_what_is_on_disk(store: DiskBlobStore) -> None:
    service = DiskDescriptorService(store)
    with pytest.raises(BlobUnknown):
        await service.stat(DIGEST)
    await store.put(DIGEST, DATA)
    assert await service.stat(DIGEST) == Descriptor(DIGEST, len(DATA))
    # clear() forgets nothing: removing content is eviction's job.
    await service.clear(DIGEST)
    assert (await service.stat(DIGEST)).size == len(DATA)


async def test_used_bytes_follow_commits_and_deletes(store: DiskBlobStore) -> None:
    other = b"another blob"
    assert store.used_bytes == 0
    await store.put(DIGEST, DATA)
    await store.put(DIGEST, DATA)  # the same content again replaces, never double-counts
    await store.put(Digest.of(other), other)
    assert store.used_bytes == len(DATA) + len(other)

    await store.delete(DIGEST)
    await store.delete(DIGEST)
    assert store.used_bytes == len(other)


async def test_open_store_counts_what_is_stored(store: DiskBlobStore) -> None:
    await store.put(DIGEST, DATA)
    reopened = DiskBlobStore(store.root)
    reopened.open_store()
    assert reopened.used_bytes == len(DATA)
    assert reopened.list_committed()[0][0] == DIGEST


async def test_on_commit_hook_runs_after_each_commit(store: DiskBlobStore) -> None:
    commits: list[int] = []
    store.on_commit = lambda: commits.append(store.used_bytes)
    await store.put(DIGEST, DATA)
    with pytest.raises(DigestMismatch):
        await store.put(DIGEST, b"wrong")
    assert commits == [len(DATA)]


async def test_the_background_count_adds_what_was_there_and_counts_nothing_twice(
    tmp_path: Path,
) -> None:
    before, during = b"stored by a previous run", b"committed while the count runs"
    first = DiskBlobStore(tmp_path)
    first.open_store()
    await first.put(Digest.of(before), before)
    store = DiskBlobStore(tmp_path)
    store.prepare()  # what the registry does before it serves
    assert store.counting and store.used_bytes == 0
    await store.put(Digest.of(during), during)  # counted now, and seen by the walk too
    assert store.used_bytes == len(during)
    await store.count()
    assert not store.counting
    assert store.used_bytes == len(before) + len(during)
    assert store.blob_count == 2


# --- a full disk -----------------------------------------------------------------------


def fail_writes(monkeypatch: pytest.MonkeyPatch, error: int = errno.ENOSPC) -> list[int]:
    """Every ``os.writev`` fails with ``error``; returns the list of attempts."""
    attempts: list[int] = []

    def writev(fd: int, buffers: object) -> int:
        attempts.append(fd)
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "writev", writev)
    return attempts


async def test_a_failed_write_drops_the_temp_file_and_keeps_hashing(
    store: DiskBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"layer bytes" * 100
    digest = Digest.of(data)
    writer = await store.create(digest, len(data))
    assert writer.temp_path is not None and len(temp_files(store)) == 1
    attempts = fail_writes(monkeypatch, errno.EIO)
    needed: list[bool] = []
    store.on_space_needed = lambda: needed.append(True)

    with pytest.raises(CacheWriteFailed) as info:
        await writer.write(data[:500])
    assert info.value.reason == "write_error" and info.value.errno == errno.EIO
    assert writer.temp_path is None and temp_files(store) == []
    assert needed == [True]
    await writer.write(data[500:])  # hashing only, no second attempt on the disk
    assert len(attempts) == 1
    await writer.verify(Descriptor(digest, len(data)))
    with pytest.raises(CacheWriteFailed):
        await writer.commit(Descriptor(digest, len(data)))
    assert not store.path(digest).exists()
    await writer.cancel()


async def test_a_writer_without_a_file_still_refuses_wrong_bytes(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, min_free=1 << 60)
    store.open_store()
    writer = await store.create(Digest.of(b"right"), 5)
    assert writer.failure is not None and writer.failure.reason == "low_space"
    await writer.write(b"wrong")
    with pytest.raises(DigestMismatch):
        await writer.commit(Descriptor(Digest.of(b"right"), 5))


@pytest.mark.parametrize(("min_free", "low"), [(0, False), (0.9999, True), (1 << 60, True)])
def test_min_free_as_bytes_or_share(tmp_path: Path, min_free: int | float, low: bool) -> None:
    store = DiskBlobStore(tmp_path, min_free=min_free)
    store.open_store()
    free, threshold = store.space()
    assert free >= 0 and threshold >= 0
    assert store.low_on_space() is low


async def test_space_counts_what_writes_in_progress_still_need(tmp_path: Path) -> None:
    store = DiskBlobStore(tmp_path, min_free=0)
    store.open_store()
    free_before, _ = store.space()
    writer = await store.create(Digest.of(b"x"), 1 << 40)  # a terabyte announced
    assert writer.failure is not None, "more than the disk holds: not started"
    half = free_before // 2
    started = await store.create(Digest.of(b"y"), half)
    assert started.failure is None
    free_after, _ = store.space()
    assert free_after <= free_before - half + (1 << 20)
    await started.cancel()
