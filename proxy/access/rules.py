"""``access.rules``: which rule governs ``<upstream>/<repository>``, and whom it names.

A pattern is a glob over ``<upstream>/<repository>``: ``*`` matches within one path
component, ``**`` across components, ``${user}`` is the requesting local user's name
(a rule with it matches no one else). The longest matching pattern (after ``${user}``
is filled in) wins, as in zot; no matching rule means deny.

Principals in ``pull``: ``anonymous`` (anyone, public content only), ``authenticated``
(any local user), ``passthrough`` (any credential the upstream itself accepts for that
repository), ``group:<name>`` (``access.groups``) and user names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.access.bounded import Bounded
from proxy.settings import AccessRule

USER_PLACEHOLDER = "${user}"
SPECIAL = frozenset({"anonymous", "authenticated", "passthrough"})
MAX_CACHED = 50_000


@dataclass(frozen=True, slots=True)
class Grant:
    """Who one rule lets pull."""

    pattern: str
    anonymous: bool
    authenticated: bool
    passthrough: bool
    users: frozenset[str]
    groups: frozenset[str]

    def names(self, user: str, groups: frozenset[str]) -> bool:
        """Whether the local ``user`` (in ``groups``) is granted by name or group."""
        return self.authenticated or user in self.users or bool(groups & self.groups)


def _grant(rule: AccessRule) -> Grant:
    users = {p for p in rule.pull if p not in SPECIAL and not p.startswith("group:")}
    groups = {p.removeprefix("group:") for p in rule.pull if p.startswith("group:")}
    return Grant(
        rule.repos,
        "anonymous" in rule.pull,
        "authenticated" in rule.pull,
        "passthrough" in rule.pull,
        frozenset(users),
        frozenset(groups),
    )


def glob_regex(pattern: str) -> str:
    out = []
    for part in re.split(r"(\*\*|\*)", pattern):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(part))
    return "".join(out)


class Rules:
    def __init__(self, rules: Sequence[AccessRule], groups: Mapping[str, Sequence[str]]) -> None:
        self._plain: list[tuple[re.Pattern[str], int, Grant]] = []
        # The regexes of the parts around each ${user}, joined by the requester's name
        # at match time (a capture group would be filled greedily by a neighbouring glob).
        self._templated: list[tuple[list[str], str, Grant]] = []
        for rule in rules:
            grant = _grant(rule)
            if USER_PLACEHOLDER in rule.repos:
                parts = [glob_regex(part) for part in rule.repos.split(USER_PLACEHOLDER)]
                self._templated.append((parts, rule.repos, grant))
            else:
                self._plain.append((re.compile(glob_regex(rule.repos)), len(rule.repos), grant))
        self._members: dict[str, frozenset[str]] = {}
        for group, members in groups.items():
            for user in members:
                self._members[user] = self._members.get(user, frozenset()) | {group}
        self._cache: Bounded[tuple[str, str | None], Grant | None] = Bounded(MAX_CACHED)

    def groups_of(self, user: str) -> frozenset[str]:
        return self._members.get(user, frozenset())

    def match(self, path: str, user: str | None) -> Grant | None:
        """The rule governing ``path`` (``<upstream>/<repository>``) for ``user``."""
        key = (path, user if self._templated else None)
        try:
            return self._cache[key]
        except KeyError:
            pass
        best: Grant | None = None
        best_length = -1
        for regex, length, grant in self._plain:
            if length > best_length and regex.fullmatch(path):
                best, best_length = grant, length
        if user and "/" not in user:  # a name fills one path component, never more
            for parts, pattern, grant in self._templated:
                length = len(pattern) + (len(parts) - 1) * (len(user) - len(USER_PLACEHOLDER))
                if length > best_length and re.fullmatch(re.escape(user).join(parts), path):
                    best, best_length = grant, length
        self._cache[key] = best
        return best
