"""Which upstream a request is for, and the repository name to ask it for.

In order:
1. containerd's ``?ns=<registry host[:port]>``: the upstream whose URL host or alias it
   names; an ``ns`` that names none is refused (404 NAME_UNKNOWN naming it), never
   served from another registry.
2. A path prefix ``/v2/<upstream-name>/<repo>/...`` for clients that cannot send ``ns``.
   When the first component is an upstream's name, the prefix wins over a repository of
   that name on the default upstream.
3. The default upstream, for bare ``/v2/<repo>/...`` (Docker's ``registry-mirrors``).

containerd with ``override_path`` pointing at ``/v2/<upstream-name>`` sends both the prefix
and ``ns``; when the prefix names the upstream that ``ns`` routes to, it is dropped.

Docker Hub names are normalised: ``nginx`` is ``library/nginx``.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.access.bounded import Bounded
from proxy.errors import NameInvalid, NameUnknown
from proxy.model import MAX_NAME_LENGTH, parse_name
from proxy.settings import UpstreamSettings

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
MAX_ROUTES = 4096


@dataclass(frozen=True, slots=True)
class Route:
    upstream: UpstreamSettings
    repo: str
    """The repository name on the upstream (normalised)."""
    namespace: str | None = None
    """The ``ns`` the request was routed by, echoed as ``OCI-Namespace``."""


class Router:
    def __init__(self, upstreams: tuple[UpstreamSettings, ...]) -> None:
        self._by_ns = {ns: up for up in upstreams for ns in up.namespaces()}
        self._by_name = {up.name: up for up in upstreams}
        self._default = next((up for up in upstreams if up.default), None)
        # Routes are a pure function of (name, ns) and the settings: a client pulling an
        # image asks the same few on every request. Only routes are remembered (a name
        # that is refused is checked again each time), at most MAX_ROUTES of them.
        self._routes: Bounded[tuple[str, str | None], Route] = Bounded(MAX_ROUTES)

    def route(self, name: str, ns: str | None) -> Route:
        """Route a validated client-side repository name; raises NameUnknown."""
        key = (name, ns)
        known = self._routes.get(key)
        if known is not None:
            return known
        route = self._route(name, ns)
        self._routes[key] = route
        return route

    def _route(self, name: str, ns: str | None) -> Route:
        parse_name(name)
        if ns is not None:
            upstream = self._by_ns.get(ns.lower())
            if upstream is None:
                raise NameUnknown(f"namespace {ns[:255]!r} is not served by this proxy")
            first, _, rest = name.partition("/")
            if rest and first == upstream.name:
                name = rest  # containerd with override_path to /v2/<upstream-name> sends both
            return Route(upstream, _normalise(upstream, name), ns)
        first, _, rest = name.partition("/")
        if rest and first in self._by_name:
            upstream = self._by_name[first]
            return Route(upstream, _normalise(upstream, rest))
        if self._default is None:
            raise NameUnknown(
                f"repository {name!r} names no upstream and no default upstream is configured"
            )
        return Route(self._default, _normalise(self._default, name))


def is_docker_hub(upstream: UpstreamSettings) -> bool:
    return bool(upstream.namespaces() & DOCKER_HUB_HOSTS)


def _normalise(upstream: UpstreamSettings, repo: str) -> str:
    """The name the upstream is asked for; refused locally (NAME_INVALID) when longer than
    a registry accepts, so the upstream never sees it (Docker Hub's ``library/`` prefix
    can take a valid client-side name over the limit)."""
    if "/" not in repo and is_docker_hub(upstream):
        repo = "library/" + repo
    if len(repo) > MAX_NAME_LENGTH:
        raise NameInvalid(f"repository name longer than {MAX_NAME_LENGTH} characters upstream")
    return repo
