"""Htpasswd: bcrypt users from a file, re-read when it changes, verified passwords
remembered, a lockout after repeated failures and bounded bcrypt work. bcrypt runs at
rounds=4; time is a clock the test moves."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest

from proxy.access import htpasswd
from proxy.access.htpasswd import (
    FAILURE_WINDOW,
    MAX_CONCURRENT,
    MAX_FAILURES,
    RELOAD_INTERVAL,
    Htpasswd,
)
from proxy.errors import TooManyRequests
from tests.unit.clock import Clock


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


ALICE = bcrypt_hash("alice-pw")
BOB = bcrypt_hash("bob-pw")


class CountingCheck:
    """Stands in for ``htpasswd._check``: the real bcrypt check, counted."""

    def __init__(self) -> None:
        self.calls = 0
        self._real = htpasswd._check

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        self.calls += 1
        return self._real(password, hashed)


@pytest.fixture
def checks(monkeypatch: pytest.MonkeyPatch) -> CountingCheck:
    counting = CountingCheck()
    monkeypatch.setattr(htpasswd, "_check", counting)
    return counting


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    file = tmp_path / "htpasswd"
    file.write_text(f"alice:{ALICE}\nbob:{BOB}\n", encoding="utf-8")
    return file


@pytest.fixture
def users(path: Path, clock: Clock) -> Htpasswd:
    table = Htpasswd(path, clock=clock)
    table.load()
    return table


def remove(path: Path) -> None:
    path.unlink()


def rewrite(path: Path, text: str) -> None:
    """New content and a modification time surely different from the old one."""
    rewrite_bytes(path, text.encode())


def rewrite_bytes(path: Path, data: bytes) -> None:
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


async def test_the_right_password_verifies(users: Htpasswd, checks: CountingCheck) -> None:
    assert await users.verify("alice", "alice-pw")
    assert await users.verify("bob", "bob-pw")
    assert checks.calls == 2


async def test_a_wrong_password_does_not(users: Htpasswd) -> None:
    assert not await users.verify("alice", "bob-pw")
    assert not await users.verify("alice", "")
    assert not await users.verify("alice", "alice-pw ")


async def test_an_unknown_user_is_refused_without_hashing(
    users: Htpasswd, checks: CountingCheck
) -> None:
    assert not await users.verify("mallory", "alice-pw")
    assert checks.calls == 0


def test_users_and_membership(users: Htpasswd) -> None:
    assert users.users() == frozenset({"alice", "bob"})
    assert "alice" in users
    assert "mallory" not in users


def test_load_of_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        Htpasswd(tmp_path / "absent").load()


def test_load_of_a_file_that_is_not_utf8_raises_oserror(tmp_path: Path) -> None:
    file = tmp_path / "htpasswd"
    file.write_bytes(b"alice:\xff\n")

    with pytest.raises(OSError, match="not UTF-8"):
        Htpasswd(file).load()


def test_lines_without_a_bcrypt_hash_are_ignored(tmp_path: Path, clock: Clock) -> None:
    file = tmp_path / "htpasswd"
    file.write_text(
        "\n".join(
            [
                "# a comment",
                "",
                f"alice:{ALICE}",
                "md5:$apr1$abcdefgh$0123456789abcdefghijkl",
                "sha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
                "crypt:abJnggxhB/yWI",
                "plain:password",
                "no-colon-at-all",
                f"  carol:{BOB.replace('$2b$', '$2y$')}  ",
            ]
        ),
        encoding="utf-8",
    )
    table = Htpasswd(file, clock=clock)
    table.load()

    assert table.users() == frozenset({"alice", "carol"})


async def test_2y_hashes_as_htpasswd_writes_them_verify(tmp_path: Path, clock: Clock) -> None:
    file = tmp_path / "htpasswd"
    file.write_text(f"carol:{BOB.replace('$2b$', '$2y$')}\n", encoding="utf-8")
    table = Htpasswd(file, clock=clock)

    assert await table.verify("carol", "bob-pw")


async def test_a_malformed_bcrypt_hash_is_a_wrong_password(tmp_path: Path, clock: Clock) -> None:
    file = tmp_path / "htpasswd"
    file.write_text("eve:$2b$04$tooshort\n", encoding="utf-8")
    table = Htpasswd(file, clock=clock)

    assert "eve" in table
    assert not await table.verify("eve", "anything")


# --- reloading ----------------------------------------------------------------------------


async def test_a_changed_file_is_reread_after_the_interval(
    users: Htpasswd, path: Path, clock: Clock
) -> None:
    assert "carol" not in users  # the first look stats the file
    rewrite(path, f"alice:{ALICE}\ncarol:{BOB}\n")

    clock.advance(RELOAD_INTERVAL / 2)
    assert "carol" not in users  # checked at most once per interval
    clock.advance(RELOAD_INTERVAL)
    assert "carol" in users
    assert "bob" not in users
    assert await users.verify("carol", "bob-pw")
    assert not await users.verify("bob", "bob-pw")


async def test_a_same_size_change_is_seen_by_its_mtime(
    users: Htpasswd, path: Path, clock: Clock
) -> None:
    new_alice = bcrypt_hash("new-pw")
    assert len(new_alice) == len(ALICE)
    assert await users.verify("alice", "alice-pw")

    rewrite(path, f"alice:{new_alice}\nbob:{BOB}\n")
    clock.advance(RELOAD_INTERVAL)

    assert await users.verify("alice", "new-pw")
    # The password remembered for the old file is forgotten with it.
    assert not await users.verify("alice", "alice-pw")


async def test_an_unchanged_file_is_not_reread(
    users: Htpasswd, path: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    real = Htpasswd._read

    def counting_read(self: Htpasswd, stat: os.stat_result) -> None:
        reads.append(1)
        real(self, stat)

    monkeypatch.setattr(Htpasswd, "_read", counting_read)
    for _ in range(3):
        clock.advance(RELOAD_INTERVAL)
        assert "alice" in users

    assert reads == []


async def test_a_file_that_disappears_keeps_the_users_last_read(
    users: Htpasswd, path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    remove(path)
    for _ in range(2):
        clock.advance(RELOAD_INTERVAL)
        assert users.users() == frozenset({"alice", "bob"})

    assert await users.verify("alice", "alice-pw")
    warnings = [r for r in caplog.records if "cannot re-read" in r.getMessage()]
    assert len(warnings) == 1  # said once


async def test_a_file_that_is_not_utf8_keeps_the_users_last_read(
    users: Htpasswd, path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    assert "alice" in users
    rewrite_bytes(path, f"# caf\xe9 in latin-1\nalice:{ALICE}\n".encode("latin-1"))

    clock.advance(RELOAD_INTERVAL)

    assert users.users() == frozenset({"alice", "bob"})
    assert await users.verify("bob", "bob-pw")
    assert [r for r in caplog.records if "cannot re-read" in r.getMessage()]


# --- remembered passwords -----------------------------------------------------------------


async def test_a_verified_password_is_not_hashed_again(
    users: Htpasswd, checks: CountingCheck
) -> None:
    for _ in range(5):
        assert await users.verify("alice", "alice-pw")

    assert checks.calls == 1


async def test_a_remembered_password_is_the_users_only(
    users: Htpasswd, checks: CountingCheck
) -> None:
    assert await users.verify("alice", "alice-pw")

    assert not await users.verify("bob", "alice-pw")
    assert not await users.verify("alice", "alice-pw2")
    assert checks.calls == 3


async def test_wrong_passwords_are_hashed_every_time(
    users: Htpasswd, checks: CountingCheck
) -> None:
    for _ in range(3):
        assert not await users.verify("alice", "wrong")

    assert checks.calls == 3


# --- lockout ------------------------------------------------------------------------------


async def fail(users: Htpasswd, user: str, times: int) -> None:
    for _ in range(times):
        assert not await users.verify(user, "wrong")


async def test_after_max_failures_attempts_are_refused_without_hashing(
    users: Htpasswd, checks: CountingCheck, clock: Clock
) -> None:
    await fail(users, "alice", MAX_FAILURES)
    assert checks.calls == MAX_FAILURES

    clock.advance(10)
    for password in ("wrong", "alice-pw"):
        with pytest.raises(TooManyRequests) as info:
            await users.verify("alice", password)
        retry = int(info.value.headers["Retry-After"])
        assert 0 < retry <= FAILURE_WINDOW - 10 + 1

    assert checks.calls == MAX_FAILURES


async def test_the_lockout_is_per_user(users: Htpasswd) -> None:
    await fail(users, "alice", MAX_FAILURES)

    assert await users.verify("bob", "bob-pw")
    with pytest.raises(TooManyRequests):
        await users.verify("alice", "alice-pw")


async def test_the_lockout_ends_with_the_window(users: Htpasswd, clock: Clock) -> None:
    await fail(users, "alice", MAX_FAILURES)

    clock.advance(FAILURE_WINDOW)

    assert await users.verify("alice", "alice-pw")


async def test_failures_spread_beyond_the_window_never_lock(users: Htpasswd, clock: Clock) -> None:
    for _ in range(3 * MAX_FAILURES):
        assert not await users.verify("alice", "wrong")
        clock.advance(FAILURE_WINDOW / (MAX_FAILURES - 1))

    assert await users.verify("alice", "alice-pw")


async def test_a_success_clears_the_failures(users: Htpasswd) -> None:
    await fail(users, "alice", MAX_FAILURES - 1)
    assert await users.verify("alice", "alice-pw")

    await fail(users, "alice", MAX_FAILURES - 1)
    assert not await users.verify("alice", "still-wrong")  # not yet refused


async def test_a_remembered_password_still_passes_during_a_lockout(
    users: Htpasswd, checks: CountingCheck
) -> None:
    assert await users.verify("alice", "alice-pw")
    await fail(users, "alice", MAX_FAILURES)

    assert await users.verify("alice", "alice-pw")
    assert checks.calls == 1 + MAX_FAILURES


async def test_concurrent_wrong_passwords_all_count(users: Htpasswd, checks: CountingCheck) -> None:
    # A login storm sends its guesses at once: each failure must count, not only the last.
    storm = 2 * MAX_FAILURES
    results = await asyncio.gather(*(users.verify("alice", f"guess-{i}") for i in range(storm)))
    assert results == [False] * storm

    with pytest.raises(TooManyRequests):
        await users.verify("alice", "wrong")
    assert checks.calls == storm


# --- bounded bcrypt work ------------------------------------------------------------------


class BlockingCheck:
    """Stands in for ``htpasswd._check``: holds each caller until ``release``; tells the
    loop how many are inside."""

    def __init__(self, loop: asyncio.AbstractEventLoop, signal: Callable[[int], None]) -> None:
        self._loop = loop
        self._signal = signal
        self._lock = threading.Lock()
        self.release = threading.Event()
        self.inside = 0
        self.most = 0

    def __call__(self, password: bytes, hashed: bytes) -> bool:
        with self._lock:
            self.inside += 1
            self.most = max(self.most, self.inside)
            now = self.inside
        self._loop.call_soon_threadsafe(self._signal, now)
        self.release.wait(timeout=30)
        with self._lock:
            self.inside -= 1
        return True


async def test_at_most_max_concurrent_verifications_run_at_once(
    users: Htpasswd, monkeypatch: pytest.MonkeyPatch
) -> None:
    entered: asyncio.Queue[int] = asyncio.Queue()
    check = BlockingCheck(asyncio.get_running_loop(), entered.put_nowait)
    monkeypatch.setattr(htpasswd, "_check", check)
    try:
        tasks = [
            asyncio.create_task(users.verify("alice", f"pw-{i}")) for i in range(MAX_CONCURRENT + 3)
        ]
        for _ in range(MAX_CONCURRENT):
            await entered.get()
        for _ in range(20):
            await asyncio.sleep(0)  # give any task not held by the bound the chance to enter
        assert check.inside == MAX_CONCURRENT
    finally:
        check.release.set()
    assert all(await asyncio.gather(*tasks))
    assert check.most == MAX_CONCURRENT


async def test_beyond_max_waiting_a_login_is_refused_at_once(
    users: Htpasswd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(htpasswd, "MAX_WAITING", 1)
    entered: asyncio.Queue[int] = asyncio.Queue()
    check = BlockingCheck(asyncio.get_running_loop(), entered.put_nowait)
    monkeypatch.setattr(htpasswd, "_check", check)
    try:
        first = asyncio.create_task(users.verify("alice", "alice-pw"))
        await entered.get()

        with pytest.raises(TooManyRequests) as info:
            await users.verify("bob", "bob-pw")
        assert info.value.headers["Retry-After"] == "1"
    finally:
        check.release.set()
    assert await first
    # The slot is given back: the next login goes through.
    assert await users.verify("bob", "bob-pw")


async def test_a_lockout_is_per_source_so_strangers_cannot_lock_a_user_out(
    tmp_path: Path,
) -> None:
    path = tmp_path / "htpasswd"
    path.write_text(f"alice:{ALICE}\n")
    users = Htpasswd(path)
    users.load()
    for _ in range(MAX_FAILURES):
        assert not await users.verify("alice", "wrong", "198.51.100.7")
    with pytest.raises(TooManyRequests):
        await users.verify("alice", "alice-pw", "198.51.100.7")
    assert await users.verify("alice", "alice-pw", "10.0.0.5")
