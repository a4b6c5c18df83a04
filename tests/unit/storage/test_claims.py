"""The temp file as the lock of a fetch shared by workers (proxy.storage.claims).

Two claims in one process stand for two workers: ``flock`` locks belong to the open file
description, so two opens of one file conflict as two processes' would.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from proxy.model import Descriptor, Digest
from proxy.storage.claims import FetchClaims, FileState, remove_unlocked
from proxy.storage.disk import TMP_DIR, DiskBlobStore

DATA = b"x" * 5000
DIGEST = Digest.of(DATA)


def make_store(tmp_path: Path) -> DiskBlobStore:
    store = DiskBlobStore(tmp_path / "cache")
    store.open_store()
    return store


def test_the_first_claim_owns_the_next_follows_and_sees_the_commit(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    owner = store.claims.take(DIGEST)
    follower = store.claims.take(DIGEST)
    assert owner is not None and owner.owned and owner.offset == 0
    assert follower is not None and not follower.owned
    assert follower.meta() is None  # nothing published yet
    owner.publish(len(DATA), ("up", "team/app"))
    meta = follower.meta()
    assert meta is not None and meta.size == len(DATA) and meta.origin == ("up", "team/app")
    assert meta.pid == os.getpid()
    assert owner.fd is not None
    os.write(owner.fd, DATA[:100])
    assert follower.size_now() == 100
    assert follower.state() is FileState.RUNNING and not follower.try_lock()
    os.write(owner.fd, DATA[100:])
    store.path(DIGEST).parent.mkdir(parents=True, exist_ok=True)
    os.rename(owner.path, store.path(DIGEST))
    assert follower.state() is FileState.COMMITTED
    owner.release()
    assert not owner.meta_path.exists()
    assert follower.try_lock()
    assert follower.state() is FileState.COMMITTED
    follower.release()


def test_a_file_removed_without_a_commit_is_a_failed_fetch(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    owner = store.claims.take(DIGEST)
    follower = store.claims.take(DIGEST)
    assert owner is not None and follower is not None
    owner.abandon()
    assert follower.state() is FileState.REMOVED
    assert follower.try_lock()  # the lock went with the owner; the file is gone all the same
    assert follower.state() is FileState.REMOVED
    follower.release()
    fresh = store.claims.take(DIGEST)  # a new fetch: a new file
    assert fresh is not None and fresh.owned and fresh.offset == 0
    fresh.release()


def test_a_dead_owner_leaves_its_file_and_lock_to_the_follower(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    owner = store.claims.take(DIGEST)
    follower = store.claims.take(DIGEST)
    assert owner is not None and owner.fd is not None and follower is not None
    os.write(owner.fd, DATA[:1234])
    os.close(owner.fd)  # what the kernel does for a process that dies: no rename, no unlink
    assert follower.try_lock()
    assert follower.owned and follower.offset == 1234
    assert follower.state() is FileState.RUNNING
    follower.release()
    # With no follower, the next claim continues what is there.
    later = store.claims.take(DIGEST)
    assert later is not None and later.owned and later.offset == 1234
    later.release()


def test_a_claim_after_the_commit_finds_it_and_removes_the_stale_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.path(DIGEST).parent.mkdir(parents=True, exist_ok=True)
    store.path(DIGEST).write_bytes(DATA)
    store.claims.path(DIGEST).write_bytes(DATA[:10])
    assert store.claims.take(DIGEST) is None
    assert not store.claims.path(DIGEST).exists()


def test_held_names_only_a_fetch_someone_runs(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert store.claims.held(DIGEST) is None  # no file
    assert not store.claims.path(DIGEST).exists()  # and none made
    store.claims.path(DIGEST).write_bytes(b"left")
    assert store.claims.held(DIGEST) is None  # nobody's
    owner = store.claims.take(DIGEST)
    assert owner is not None and owner.owned and owner.offset == 4
    followed = store.claims.held(DIGEST)
    assert followed is not None and not followed.owned
    followed.release()
    owner.release()


def test_start_up_removes_only_the_temp_files_nobody_holds(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    tmp = tmp_path / "cache" / TMP_DIR
    live = store.claims.take(DIGEST)
    assert live is not None
    live.publish(len(DATA), ("up", "r"))
    dead = tmp / f"{'ab' * 32}.part"
    dead.write_bytes(b"old")
    (tmp / f"{'ab' * 32}.meta").write_text("{}")
    writing = tmp / f"{'cd' * 32}.1234.part"
    fd = os.open(writing, os.O_WRONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    DiskBlobStore(tmp_path / "cache").prepare()
    assert sorted(p.name for p in tmp.iterdir()) == sorted(
        [live.path.name, live.meta_path.name, writing.name]
    )
    assert not remove_unlocked(writing)
    os.close(fd)
    assert remove_unlocked(writing) and not writing.exists()
    live.release()


def test_a_claimed_writer_continues_after_the_bytes_in_the_file(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    claims = FetchClaims(tmp_path / "cache" / TMP_DIR, store.path)
    path = claims.path(DIGEST)
    path.write_bytes(DATA[:3000])
    claim = claims.take(DIGEST)
    assert claim is not None and claim.offset == 3000

    async def run() -> None:
        writer = await store.create(DIGEST, len(DATA), claim=claim)
        assert writer.written == 3000
        await writer.write(DATA[3000:])
        await writer.commit(Descriptor(DIGEST, len(DATA)))

    asyncio.run(run())
    assert store.path(DIGEST).read_bytes() == DATA
    claim.release()
