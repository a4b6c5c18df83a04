"""Routing: ?ns=, path prefix, default upstream, Docker Hub name normalisation."""

from __future__ import annotations

import pytest

from proxy.errors import NameInvalid, NameUnknown
from proxy.routing import Route, Router, is_docker_hub
from proxy.settings import DEFAULT_DOCKERHUB_ALIASES, UpstreamSettings

HUB = UpstreamSettings(
    name="dockerhub",
    url="https://registry-1.docker.io",
    aliases=DEFAULT_DOCKERHUB_ALIASES,
    default=True,
)
GHCR = UpstreamSettings(name="ghcr", url="https://ghcr.io")
LOCAL = UpstreamSettings(name="local", url="http://127.0.0.1:5001", aliases=("Registry.Local",))


@pytest.fixture
def router() -> Router:
    return Router((HUB, GHCR, LOCAL))


@pytest.mark.parametrize(
    ("ns", "name", "upstream", "repo"),
    [
        ("ghcr.io", "owner/app", GHCR, "owner/app"),
        ("GHCR.IO", "owner/app", GHCR, "owner/app"),
        ("127.0.0.1:5001", "app", LOCAL, "app"),
        ("registry.local", "team/app", LOCAL, "team/app"),
        ("docker.io", "nginx", HUB, "library/nginx"),
        ("index.docker.io", "library/nginx", HUB, "library/nginx"),
        ("registry-1.docker.io", "bitnami/redis", HUB, "bitnami/redis"),
        # With ns the path is never read as a prefix: "ghcr" is a repository here.
        ("docker.io", "ghcr/app", HUB, "ghcr/app"),
    ],
)
def test_routes_by_namespace(
    router: Router, ns: str, name: str, upstream: UpstreamSettings, repo: str
) -> None:
    assert router.route(name, ns) == Route(upstream, repo, ns)


def test_unknown_namespace_is_refused_naming_it(router: Router) -> None:
    with pytest.raises(NameUnknown) as info:
        router.route("app", "quay.io")
    assert "quay.io" in info.value.message
    assert info.value.status == 404


def test_namespace_without_port_does_not_match_host_with_port(router: Router) -> None:
    with pytest.raises(NameUnknown):
        router.route("app", "127.0.0.1")


@pytest.mark.parametrize(
    ("name", "upstream", "repo"),
    [
        ("ghcr/owner/app", GHCR, "owner/app"),
        ("local/app", LOCAL, "app"),
        ("local/team/app", LOCAL, "team/app"),
        ("dockerhub/nginx", HUB, "library/nginx"),
        ("dockerhub/bitnami/redis", HUB, "bitnami/redis"),
    ],
)
def test_routes_by_path_prefix(
    router: Router, name: str, upstream: UpstreamSettings, repo: str
) -> None:
    route = router.route(name, None)
    assert route == Route(upstream, repo, None)


@pytest.mark.parametrize(
    ("name", "repo"),
    [
        ("nginx", "library/nginx"),
        ("library/nginx", "library/nginx"),
        ("bitnami/redis", "bitnami/redis"),
        # An upstream's name alone is a repository, not a prefix.
        ("ghcr", "library/ghcr"),
    ],
)
def test_bare_names_go_to_the_default_upstream(router: Router, name: str, repo: str) -> None:
    assert router.route(name, None) == Route(HUB, repo, None)


def test_non_docker_hub_default_keeps_single_component_names() -> None:
    router = Router((UpstreamSettings(name="local", url="http://127.0.0.1:5001", default=True),))
    assert router.route("app", None).repo == "app"


def test_no_default_and_no_prefix_is_name_unknown() -> None:
    router = Router((GHCR, LOCAL))
    with pytest.raises(NameUnknown):
        router.route("library/nginx", None)
    assert router.route("ghcr/owner/app", None).upstream == GHCR


@pytest.mark.parametrize("name", ["Nginx", "a//b", "/a", "a/../b", ""])
def test_invalid_names_are_refused(router: Router, name: str) -> None:
    with pytest.raises(NameInvalid):
        router.route(name, None)


def test_is_docker_hub() -> None:
    assert is_docker_hub(HUB)
    assert is_docker_hub(UpstreamSettings(name="hub", url="https://index.docker.io"))
    assert not is_docker_hub(GHCR)
    assert not is_docker_hub(LOCAL)


@pytest.mark.parametrize(
    ("ns", "name"),
    [
        ("docker.io", "a" * 250),  # library/ + 250 characters: 258 upstream
        (None, "a" * 250),
        (None, "dockerhub/" + "a" * 250),
    ],
)
def test_a_name_the_upstream_would_refuse_for_its_length_is_invalid_locally(
    router: Router, ns: str | None, name: str
) -> None:
    with pytest.raises(NameInvalid):
        router.route(name, ns)


def test_a_name_of_the_longest_length_is_routed(router: Router) -> None:
    name = "team/" + "a" * 250
    assert router.route(name, None).repo == name
    prefixed = "team/" + "a" * 245  # the prefix counts client-side, not upstream
    assert router.route("ghcr/" + prefixed, None).repo == prefixed


def test_a_remembered_route_is_the_same_answer(router: Router) -> None:
    first = router.route("nginx", "GHCR.IO")
    again = router.route("nginx", "GHCR.IO")
    assert again is first
    assert again == Route(GHCR, "nginx", "GHCR.IO")
    # Another spelling of the same ns is its own entry, echoed as it was sent.
    assert router.route("nginx", "ghcr.io").namespace == "ghcr.io"


def test_a_refused_name_is_refused_every_time(router: Router) -> None:
    for _ in range(2):
        with pytest.raises(NameInvalid):
            router.route("UPPER/case", None)
        with pytest.raises(NameUnknown):
            router.route("app", "unknown.example")


def test_remembered_routes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy.routing.MAX_ROUTES", 3)
    bounded = Router((HUB, GHCR, LOCAL))
    for n in range(10):
        assert bounded.route(f"team/app{n}", None).repo == f"team/app{n}"
    assert len(bounded._routes) == 3
