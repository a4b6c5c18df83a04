"""``cache.pin``: patterns over ``<upstream>/<repository>:<tag>`` whose images are never
evicted.

``*`` matches within one path component (and never across the ``:`` before the tag),
``**`` across components. ``dockerhub/library/*:latest`` pins the ``latest`` of every
official image; ``ghcr/acme/**`` (no ``:``) pins every tag of everything under ``acme``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from proxy.storage.index import Image, TagName


def _regex(pattern: str) -> str:
    out = []
    for part in re.split(r"(\*\*|\*)", pattern):
        if part == "**":
            out.append("[^:]*" if ":" in pattern else ".*")
        elif part == "*":
            out.append("[^/:]*")
        else:
            out.append(re.escape(part))
    return "".join(out)


class Pins:
    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(patterns)
        self._compiled = [re.compile(_regex(p) + r"\Z") for p in patterns]

    def __bool__(self) -> bool:
        return bool(self._compiled)

    def matches(self, name: str) -> bool:
        """Whether ``<upstream>/<repo>:<tag>`` is pinned."""
        return any(regex.match(name) for regex in self._compiled)

    def tag_pinned(self, tag: TagName) -> bool:
        upstream, repo, key = tag
        return self.matches(f"{upstream}/{repo}:{key.split('#')[0]}")

    def image_pinned(self, image: Image) -> bool:
        return any(self.tag_pinned(tag) for tag in image.tags)
