"""Rules: globs over ``<upstream>/<repository>``, the longest match wins, ``${user}``
matches its own user only, groups name their members."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest

from proxy.access.rules import Grant, Rules, glob_regex
from proxy.settings import AccessRule


def rules(
    *pairs: tuple[str, Sequence[str]], groups: Mapping[str, Sequence[str]] | None = None
) -> Rules:
    return Rules([AccessRule(repos=r, pull=tuple(p)) for r, p in pairs], groups or {})


def pattern(table: Rules, path: str, user: str | None = None) -> str | None:
    grant = table.match(path, user)
    return None if grant is None else grant.pattern


def test_no_matching_rule_is_none() -> None:
    table = rules(("dockerhub/library/**", ["anonymous"]))

    assert table.match("ghcr/org/app", None) is None
    assert table.match("ghcr/org/app", "alice") is None
    assert rules().match("dockerhub/library/alpine", None) is None


def test_the_longest_matching_pattern_wins_whatever_the_order() -> None:
    pairs = [
        ("**", ["anonymous"]),
        ("dockerhub/**", ["authenticated"]),
        ("dockerhub/library/**", ["alice"]),
    ]
    for ordered in (pairs, pairs[::-1]):
        table = rules(*ordered)
        assert pattern(table, "dockerhub/library/alpine") == "dockerhub/library/**"
        assert pattern(table, "dockerhub/bitnami/redis") == "dockerhub/**"
        assert pattern(table, "ghcr/org/app") == "**"


def test_a_longer_pattern_that_does_not_match_is_passed_over() -> None:
    table = rules(("dockerhub/**", ["anonymous"]), ("dockerhub/library/alpine-extra", ["alice"]))

    assert pattern(table, "dockerhub/library/alpine") == "dockerhub/**"


def test_one_star_stays_within_a_component() -> None:
    table = rules(("dockerhub/*", ["anonymous"]))

    assert pattern(table, "dockerhub/alpine") == "dockerhub/*"
    assert pattern(table, "dockerhub/library/alpine") is None
    assert rules(("*", ["anonymous"])).match("dockerhub/alpine", None) is None


def test_two_stars_cross_components() -> None:
    table = rules(("dockerhub/**", ["anonymous"]), ("**/alpine", ["alice"]))

    assert pattern(table, "dockerhub/a/b/c/d") == "dockerhub/**"
    assert pattern(table, "ghcr/x/y/alpine") == "**/alpine"
    assert pattern(table, "dockerhub/library/alpine") == "dockerhub/**"  # 12 > 9 characters


def test_a_star_inside_a_component() -> None:
    table = rules(("dockerhub/library/alp*", ["anonymous"]))

    assert pattern(table, "dockerhub/library/alpine") == "dockerhub/library/alp*"
    assert pattern(table, "dockerhub/library/alp") == "dockerhub/library/alp*"
    assert pattern(table, "dockerhub/library/busybox") is None
    assert pattern(table, "dockerhub/library/alpine/sub") is None


def test_other_characters_are_literal() -> None:
    table = rules(("ghcr.io/a.b/c+d", ["anonymous"]))

    assert pattern(table, "ghcr.io/a.b/c+d") == "ghcr.io/a.b/c+d"
    assert pattern(table, "ghcrxio/axb/c+d") is None
    assert pattern(table, "ghcr.io/a.b/ccd") is None


def test_the_whole_path_must_match() -> None:
    table = rules(("dockerhub/library", ["anonymous"]))

    assert pattern(table, "dockerhub/library/alpine") is None
    assert pattern(table, "x/dockerhub/library") is None


@pytest.mark.parametrize(
    ("glob", "regex"),
    [("a/*", "a/[^/]*"), ("a/**", "a/.*"), ("**/*", ".*/[^/]*"), ("a.b", r"a\.b")],
)
def test_glob_regex(glob: str, regex: str) -> None:
    assert glob_regex(glob) == regex


# --- ${user} -------------------------------------------------------------------------------


def test_a_user_placeholder_matches_only_that_user() -> None:
    table = rules(("**", ["anonymous"]), ("dockerhub/home/${user}/**", ["authenticated"]))

    assert pattern(table, "dockerhub/home/alice/app", "alice") == "dockerhub/home/${user}/**"
    assert pattern(table, "dockerhub/home/alice/app", "bob") == "**"
    assert pattern(table, "dockerhub/home/alice/app", None) == "**"


def test_a_user_placeholder_never_spans_components() -> None:
    table = rules(("dockerhub/home/${user}/**", ["authenticated"]))

    assert table.match("dockerhub/home/alice/x/app", "alice/x") is None
    assert pattern(table, "dockerhub/home/alice/x/app", "alice") == "dockerhub/home/${user}/**"


def test_a_users_name_is_matched_literally() -> None:
    table = rules(("dockerhub/home/${user}/**", ["authenticated"]))

    assert table.match("dockerhub/home/axb/app", "a.b") is None
    assert table.match("dockerhub/home/a.b/app", "a.b") is not None


def test_a_filled_in_placeholder_counts_with_the_users_name_for_length() -> None:
    table = rules(("dockerhub/home/**", ["anonymous"]), ("dockerhub/home/${user}", ["alice"]))

    # "dockerhub/home/${user}" for alice is "dockerhub/home/alice": 20 > 17 characters.
    assert pattern(table, "dockerhub/home/alice", "alice") == "dockerhub/home/${user}"
    # For a user with a one-letter name: "dockerhub/home/x" is 16 < 17, the glob wins.
    assert pattern(table, "dockerhub/home/x", "x") == "dockerhub/home/**"


@pytest.mark.parametrize(
    ("glob", "path", "user"),
    [
        ("dockerhub/${user}-*", "dockerhub/a-b-c", "a"),
        ("dockerhub/${user}*", "dockerhub/alice-tools", "alice"),
        ("**/${user}/**", "dockerhub/alice/x/y", "alice"),
        ("dockerhub/*-${user}", "dockerhub/team-a-b", "b"),
        ("dockerhub/*-${user}", "dockerhub/team-a-b", "a-b"),
        ("dockerhub/${user}/${user}-*", "dockerhub/al/al-x", "al"),
    ],
)
def test_a_placeholder_next_to_a_glob_matches_the_users_own_paths(
    glob: str, path: str, user: str
) -> None:
    table = rules((glob, ["authenticated"]))

    assert pattern(table, path, user) == glob


def test_every_placeholder_is_the_same_user() -> None:
    table = rules(("dockerhub/${user}/${user}-*", ["authenticated"]))

    assert table.match("dockerhub/al/bo-x", "al") is None
    assert table.match("dockerhub/al/bo-x", "bo") is None


def test_no_user_name_fills_a_placeholder_with_nothing() -> None:
    table = rules(("dockerhub/home/${user}", ["authenticated"]))

    assert table.match("dockerhub/home/", "") is None


def test_results_are_cached_per_user_when_a_rule_has_a_placeholder() -> None:
    table = rules(("dockerhub/${user}/**", ["authenticated"]))

    alice = table.match("dockerhub/alice/app", "alice")
    bob = table.match("dockerhub/alice/app", "bob")
    again = table.match("dockerhub/alice/app", "alice")
    anonymous = table.match("dockerhub/alice/app", None)

    assert alice is not None and again is alice
    assert bob is None and anonymous is None


def test_results_without_placeholders_are_the_same_for_everyone() -> None:
    table = rules(("dockerhub/**", ["alice"]))

    first = table.match("dockerhub/app", "alice")

    assert first is not None
    assert table.match("dockerhub/app", "bob") is first
    assert table.match("dockerhub/app", None) is first


# --- who a rule names ----------------------------------------------------------------------


def test_a_grants_principals() -> None:
    table = rules(
        ("**", ["anonymous", "passthrough", "alice", "group:ci", "group:ops", "authenticated"])
    )

    grant = table.match("dockerhub/x", None)

    assert grant == Grant(
        pattern="**",
        anonymous=True,
        authenticated=True,
        passthrough=True,
        users=frozenset({"alice"}),
        groups=frozenset({"ci", "ops"}),
    )


def test_a_grant_names_users_and_group_members() -> None:
    table = rules(
        ("dockerhub/**", ["alice", "group:ci"]),
        groups={"ci": ["robot-ci", "robot-2"], "ops": ["robot-ci", "carol"]},
    )
    grant = table.match("dockerhub/x", None)
    assert grant is not None

    assert table.groups_of("robot-ci") == frozenset({"ci", "ops"})
    assert table.groups_of("carol") == frozenset({"ops"})
    assert table.groups_of("nobody") == frozenset()
    assert grant.names("alice", table.groups_of("alice"))
    assert grant.names("robot-2", table.groups_of("robot-2"))
    assert not grant.names("carol", table.groups_of("carol"))
    assert not grant.names("bob", frozenset())
    assert not grant.anonymous and not grant.authenticated and not grant.passthrough


def test_authenticated_names_every_local_user() -> None:
    grant = rules(("**", ["authenticated"])).match("a/b", None)

    assert grant is not None
    assert grant.names("anyone", frozenset())


def test_a_group_of_the_same_name_as_a_user_is_not_the_user() -> None:
    grant = rules(("**", ["group:alice"]), groups={"alice": ["bob"]}).match("a/b", None)

    assert grant is not None
    assert not grant.names("alice", frozenset())
    assert grant.names("bob", frozenset({"alice"}))
