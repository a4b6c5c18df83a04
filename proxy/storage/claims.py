"""One fetch per blob across the worker processes of a node: the temp file is the lock.

With ``workers`` > 1 every worker serves from one cache directory. A blob fetch writes
``tmp/<hex>.part`` (one name per digest, no random part) and holds ``flock(LOCK_EX)`` on
it for the whole fetch, commit included. A worker that wants the blob opens the same
name (creating it when absent) and tries the lock without waiting:

* **got it**: after locking it checks that the name still refers to the inode it locked
  (the lock-file pattern: the holder may have renamed or removed it in between) and that
  the blob is not committed meanwhile. It owns the fetch. A file that already holds
  bytes is what a dead worker left: the new owner continues it (``offset``).
* **held**: another worker fetches. This one follows the file (``Claim.progress``): the
  bytes in it are readable as they land, the blob is committed when ``blobs/...`` names
  the same inode, the fetch failed when the file was removed without a commit
  (``st_nlink`` 0: a digest mismatch, an upstream error, a write error), and the owner
  died when the lock can be taken while the file is still there, uncommitted.

The owner's order makes those states unambiguous: it renames (commit) or unlinks
(failure) *before* it lets the lock go; the kernel drops the lock of a process that dies.

``<hex>.meta`` beside the file says what followers cannot see in it: the blob's size
(from the upstream's headers, for their ``Content-Length``) and the (upstream,
repository) it was asked for. It names the inode it describes, so a stale one is never
taken for the current fetch. It is written once the upstream answered (``publish``) and
removed with the claim.

Blocking calls throughout (a few syscalls each): the callers run them in a thread, or on
the loop where they are cheaper than the hop (the follower's poll).
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from proxy.model import Digest

CLAIM_SUFFIX = ".part"
META_SUFFIX = ".meta"


class FileState(enum.Enum):
    RUNNING = "running"
    """Being written (or abandoned by a dead owner: see ``Claim.try_lock``)."""
    COMMITTED = "committed"
    REMOVED = "removed"
    """Removed without a commit: the fetch failed."""


@dataclass(frozen=True)
class FetchMeta:
    size: int | None
    origin: tuple[str, str]
    pid: int


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class Claim:
    """One worker's handle on ``tmp/<hex>.part``: owned (``owned``: the lock is held) or
    followed. ``fd`` is read-write; a writer works on a duplicate of it."""

    def __init__(self, digest: Digest, path: Path, final: Path, fd: int, *, owned: bool) -> None:
        self.digest = digest
        self.path = path
        self.final = final
        self.fd: int | None = fd
        self.owned = owned
        st = os.fstat(fd)
        self.inode = _inode(st)
        self.offset = st.st_size if owned else 0
        """Owned: bytes already in the file when it was claimed (a dead owner's)."""

    @property
    def meta_path(self) -> Path:
        return self.path.with_suffix(META_SUFFIX)

    def _fd(self) -> int:
        assert self.fd is not None, "claim released"
        return self.fd

    # --- following ------------------------------------------------------------------

    def size_now(self) -> int:
        return os.fstat(self._fd()).st_size

    def state(self) -> FileState:
        st = os.fstat(self._fd())
        try:
            if _inode(os.stat(self.final)) == self.inode:
                return FileState.COMMITTED
        except FileNotFoundError:
            pass
        return FileState.REMOVED if st.st_nlink == 0 else FileState.RUNNING

    def try_lock(self) -> bool:
        """Take the lock if its holder let go (or died); True when this claim owns it now.

        Owning it does not mean the fetch is to be continued: look at ``state`` (the
        owner may have committed or removed the file just before it let go)."""
        try:
            fcntl.flock(self._fd(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.owned = True
        self.offset = self.size_now()
        return True

    def meta(self) -> FetchMeta | None:
        """What the owner published about this very file; None until it has."""
        try:
            data = json.loads(self.meta_path.read_bytes())
            if tuple(data["inode"]) != self.inode:
                return None
            upstream, repo = data["origin"]
            size = None if data["size"] is None else int(data["size"])
            return FetchMeta(size, (str(upstream), str(repo)), int(data["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- owning ---------------------------------------------------------------------

    def publish(self, size: int | None, origin: tuple[str, str]) -> None:
        """Tell followers the size and origin (atomically: a temp name, then rename)."""
        data = {"inode": list(self.inode), "size": size, "origin": list(origin), "pid": os.getpid()}
        temp = self.path.with_name(f"{self.path.name}.{os.getpid()}.metatmp")
        temp.write_text(json.dumps(data))
        os.replace(temp, self.meta_path)

    def abandon(self) -> None:
        """Owned: remove the file (nothing in it is to be followed or continued), then
        release. Idempotent."""
        if self.owned and self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                if _inode(os.stat(self.path)) == self.inode:
                    self.path.unlink()
        self.release()

    def release(self) -> None:
        """Remove the meta file if it is ours, close the descriptor (which lets the lock
        go). Idempotent. The owner renames or removes the data file *before* this."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        if self.owned:
            self._drop_meta()
        os.close(fd)

    def _drop_meta(self) -> None:
        try:
            data = json.loads(self.meta_path.read_bytes())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and tuple(data.get("inode", ())) == self.inode:
            with contextlib.suppress(FileNotFoundError):
                self.meta_path.unlink()


class FetchClaims:
    """Claims on the temp files of ``tmp`` (``final`` maps a digest to its committed path)."""

    def __init__(self, tmp: Path, final: Callable[[Digest], Path]) -> None:
        self._tmp = tmp
        self._final = final

    def path(self, digest: Digest) -> Path:
        return self._tmp / f"{digest.hex}{CLAIM_SUFFIX}"

    def take(self, digest: Digest) -> Claim | None:
        """Own or follow the fetch of ``digest``; None when the blob is committed (found
        after locking: a fetch that ended between the caller's miss and this)."""
        path, final = self.path(digest), self._final(digest)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Claim(digest, path, final, fd, owned=False)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = _inode(os.stat(path)) == _inode(os.fstat(fd))
            except FileNotFoundError:
                same = False
            if not same:  # renamed or removed between our open and our lock: again
                os.close(fd)
                continue
            if final.exists():  # committed meanwhile; what is here is stale
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                os.close(fd)
                return None
            claim = Claim(digest, path, final, fd, owned=True)
            # Any meta file is a former owner's (inode numbers are reused): not ours.
            with contextlib.suppress(FileNotFoundError):
                claim.meta_path.unlink()
            return claim

    def held(self, digest: Digest) -> Claim | None:
        """A follower's claim on the fetch of ``digest`` another process runs now; None
        when none does (no file, or nobody holds its lock). Never creates the file."""
        path = self._tmp / f"{digest.hex}{CLAIM_SUFFIX}"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return Claim(digest, path, self._final(digest), fd, owned=False)
        os.close(fd)  # nobody's: a leftover for the next fetch to continue
        return None


def remove_unlocked(path: Path) -> bool:
    """Remove the temp file ``path`` unless a live process holds a lock on it (a fetch, a
    write in progress). True when it was removed. Blocking."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, IsADirectoryError):
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            if _inode(os.stat(path)) != _inode(os.fstat(fd)):
                return False
        except FileNotFoundError:
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)
