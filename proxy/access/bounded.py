"""A dict with a size bound: the oldest entry goes when a new one would exceed it.

For the per-request look-ups of access control (headers, tokens, rules, verdicts), where
``cachetools.LRUCache``'s Python-level ``__getitem__`` costs more than the work it saves:
reads here are plain dict reads; only inserts pay for the bound. First-in, first-out
rather than least recently used: an entry still in use is simply computed again.
"""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Bounded(dict[K, V]):
    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key: K, value: V) -> None:
        if key not in self and len(self) >= self.maxsize:
            del self[next(iter(self))]
        super().__setitem__(key, value)
