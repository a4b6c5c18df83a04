"""SqliteState: tag mappings and repository links in ``<cache dir>/state.db``, kept across
close and reopen, pruned at open after the retention; absent, empty and corrupted files.
(The TagService and LinkService contracts themselves are in tests/contracts.)"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.interfaces import TagEntry
from proxy.model import Digest
from proxy.storage.state import DEFAULT_RETENTION, STATE_FILE, SqliteState
from tests.unit.clock import Clock

DAY = 86400.0
RETENTION = 30 * DAY
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
D1 = Digest.of(b"one")
D2 = Digest.of(b"two")


@pytest.fixture
def clock() -> Clock:
    return Clock(1_764_000_000.0)


class States:
    """Opens SqliteState instances over one directory; closes them all at teardown."""

    def __init__(self, root: Path, clock: Clock) -> None:
        self.root = root
        self.clock = clock
        self._opened: list[SqliteState] = []

    def open(self) -> SqliteState:
        state = SqliteState(self.root, retention=RETENTION, clock=self.clock)
        state.open()
        self._opened.append(state)
        return state

    def close_all(self) -> None:
        for state in self._opened:
            state.close()


@pytest.fixture
def states(tmp_path: Path, clock: Clock) -> Iterator[States]:
    states = States(tmp_path / "cache", clock)
    yield states
    states.close_all()


def entry(digest: Digest = D1, fetched_at: float = 1_764_000_000.0) -> TagEntry:
    return TagEntry(digest, MANIFEST, 512, fetched_at)


@contextmanager
def raw(states: States) -> Iterator[sqlite3.Connection]:
    """A second connection to the file, as another process (or a corruption) would have;
    closed on leaving (``with sqlite3.connect()`` alone only ends a transaction)."""
    db = sqlite3.connect(states.root / STATE_FILE, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


# --- the file -----------------------------------------------------------------------------


def test_open_creates_the_directory_and_the_file(states: States) -> None:
    assert not states.root.exists()
    states.open()
    assert (states.root / STATE_FILE).is_file()


def test_the_journal_is_wal(states: States) -> None:
    states.open()
    with raw(states) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_default_retention_is_thirty_days() -> None:
    assert DEFAULT_RETENTION == 30 * DAY


async def test_use_before_open_is_an_error(tmp_path: Path) -> None:
    state = SqliteState(tmp_path)
    with pytest.raises(AssertionError, match="before open"):
        await state.get("hub", "library/nginx", "latest")
    assert not (tmp_path / STATE_FILE).exists()


def test_close_is_idempotent_and_fine_before_open(tmp_path: Path) -> None:
    state = SqliteState(tmp_path)
    state.close()
    state.open()
    state.close()
    state.close()


async def test_an_empty_file_opens_as_an_empty_store(states: States) -> None:
    # What a crash right after creating the file leaves.
    states.root.mkdir(parents=True)
    (states.root / STATE_FILE).write_bytes(b"")
    state = states.open()
    assert await state.get("hub", "library/nginx", "latest") is None
    await state.set("hub", "library/nginx", "latest", entry())
    assert await state.get("hub", "library/nginx", "latest") == entry()


def test_a_file_that_is_not_a_database_fails_open_and_is_left_alone(states: States) -> None:
    # Current behaviour, pinned: open() raises (so PullThroughRegistry.open fails) and the
    # file is not replaced; nothing silently discards what might still be recovered.
    states.root.mkdir(parents=True)
    garbage = b"this is not sqlite " * 100
    (states.root / STATE_FILE).write_bytes(garbage)
    with pytest.raises(sqlite3.DatabaseError):
        states.open()
    assert (states.root / STATE_FILE).read_bytes() == garbage


# --- persistence --------------------------------------------------------------------------


async def test_tags_and_links_survive_close_and_reopen(states: States) -> None:
    first = states.open()
    await first.set("hub", "library/nginx", "latest", entry(D1))
    await first.set("ghcr", "team/app", "v1", entry(D2, 1_763_999_000.5))
    await first.link("hub", "library/nginx", [D1, D2])
    first.close()

    second = states.open()

    assert await second.get("hub", "library/nginx", "latest") == entry(D1)
    assert await second.get("ghcr", "team/app", "v1") == entry(D2, 1_763_999_000.5)
    assert await second.linked("hub", "library/nginx", D1) is True
    assert await second.linked("hub", "library/nginx", D2) is True
    assert await second.linked("ghcr", "team/app", D1) is False


async def test_a_write_is_durable_without_close(states: States) -> None:
    # A crash leaves the connection unclosed: what was written must already be committed.
    first = states.open()
    await first.set("hub", "library/nginx", "latest", entry())
    await first.link("hub", "library/nginx", [D1])

    with raw(states) as db:
        assert db.execute("SELECT digest FROM tags").fetchall() == [(str(D1),)]
        assert db.execute("SELECT digest FROM links").fetchall() == [(str(D1),)]
    second = states.open()
    assert await second.get("hub", "library/nginx", "latest") == entry()


async def test_a_replaced_tag_is_one_row(states: States) -> None:
    state = states.open()
    await state.set("hub", "library/nginx", "latest", entry(D1))
    await state.set("hub", "library/nginx", "latest", entry(D2))
    with raw(states) as db:
        assert db.execute("SELECT count(*), max(digest) FROM tags").fetchone() == (1, str(D2))


async def test_concurrent_calls_share_the_connection_safely(states: States) -> None:
    state = states.open()
    digests = [Digest.of(str(i).encode()) for i in range(40)]
    await asyncio.gather(
        *(state.set("hub", "team/app", f"t{i}", entry(d)) for i, d in enumerate(digests)),
        *(state.link("hub", "team/app", [d]) for d in digests),
    )
    got = await asyncio.gather(*(state.get("hub", "team/app", f"t{i}") for i in range(40)))
    assert [g.digest if g else None for g in got] == digests
    assert all(await asyncio.gather(*(state.linked("hub", "team/app", d) for d in digests)))


# --- retention ----------------------------------------------------------------------------


async def test_open_prunes_tags_older_than_the_retention(states: States, clock: Clock) -> None:
    state = states.open()
    await state.set("hub", "r", "old", entry(fetched_at=clock.now - RETENTION - 1))
    await state.set("hub", "r", "edge", entry(fetched_at=clock.now - RETENTION))
    await state.set("hub", "r", "new", entry(fetched_at=clock.now - 1))
    state.close()

    reopened = states.open()

    assert await reopened.get("hub", "r", "old") is None
    assert await reopened.get("hub", "r", "edge") is not None
    assert await reopened.get("hub", "r", "new") is not None


async def test_pruning_happens_at_open_only(states: States, clock: Clock) -> None:
    # A running proxy keeps serving what it has, however old (stale serves need it).
    state = states.open()
    old = entry(fetched_at=clock.now - 10 * RETENTION)
    await state.set("hub", "r", "old", old)
    await state.link("hub", "r", [D1])
    clock.now += 10 * RETENTION
    assert await state.get("hub", "r", "old") == old
    assert await state.linked("hub", "r", D1) is True


async def test_open_prunes_links_by_when_they_were_last_linked(
    states: States, clock: Clock
) -> None:
    state = states.open()
    await state.link("hub", "r", [D1, D2])
    clock.now += 20 * DAY
    await state.link("hub", "r", [D2])  # linked again: its age starts again
    state.close()
    clock.now += 15 * DAY  # D1 linked 35 days ago, D2 15 days ago

    reopened = states.open()

    assert await reopened.linked("hub", "r", D1) is False
    assert await reopened.linked("hub", "r", D2) is True


# --- unreadable rows ----------------------------------------------------------------------


async def test_a_row_with_an_unreadable_digest_is_a_miss(states: States) -> None:
    state = states.open()
    with raw(states) as db:
        db.execute(
            "INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("hub", "r", "bad", "sha256:not-hex", MANIFEST, 1, 1.0),
        )
        db.execute(
            "INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("hub", "r", "md5", "md5:" + "a" * 32, MANIFEST, 1, 1.0),
        )
    assert await state.get("hub", "r", "bad") is None
    assert await state.get("hub", "r", "md5") is None
    # The next set overwrites it.
    await state.set("hub", "r", "bad", entry())
    assert await state.get("hub", "r", "bad") == entry()


async def test_a_row_with_an_unreadable_size_is_a_miss(states: States) -> None:
    state = states.open()
    with raw(states) as db:
        db.execute(
            "INSERT INTO tags VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("hub", "r", "bad", str(D1), MANIFEST, "twelve", 1.0),
        )
    assert await state.get("hub", "r", "bad") is None


# --- a cache failure ----------------------------------------------------------------------


def fill_the_disk(states: States) -> None:
    """Cap the file at its current size: the next write needing a page fails with
    SQLITE_FULL, exactly as on a full filesystem."""
    with raw(states) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    for state in states._opened:
        assert state._db is not None
        state._db.execute(f"PRAGMA max_page_count = {pages}")


async def test_reads_go_on_when_the_disk_is_full(states: States) -> None:
    state = states.open()
    await state.set("hub", "r", "latest", entry())
    await state.link("hub", "r", [D1])
    fill_the_disk(states)
    assert await state.get("hub", "r", "latest") == entry()
    assert await state.linked("hub", "r", D1) is True


async def test_set_on_a_full_disk_does_not_raise(states: States) -> None:
    state = states.open()
    fill_the_disk(states)
    big = TagEntry(D1, MANIFEST + ";x=" + "y" * 20_000, 512, 1.0)
    await state.set("hub", "r", "latest", big)  # advisory: no error for the caller
    assert await state.get("hub", "r", "latest") is None, "the failed write left nothing"


async def test_link_on_a_full_disk_does_not_raise(states: States) -> None:
    state = states.open()
    fill_the_disk(states)
    await state.link("hub", "r", [Digest.of(str(i).encode()) for i in range(500)])
