"""Many upstreams behind one proxy: three real docker-registry upstreams and the proxy.

- ``anon``: anonymous, with an alias host name (``ANON_ALIAS``), the default upstream.
- ``basic``: htpasswd Basic auth; the proxy reads its password from ``password_env``.
- ``tok``: token auth against this suite's :class:`TokenServer`; password in the config.

Each registry sits behind its own counting :class:`PassThrough`, and the proxy is
configured with the pass-through URLs, so an upstream's ``host`` (what containerd sends as
``ns``) is the pass-through's ``127.0.0.1:PORT``. Images are pushed straight into the
registries (with credentials where needed), never through the pass-throughs.

:func:`running_world` starts and stops it all; the ``world`` fixture in
``tests/integration/conftest.py`` wraps it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import oci
from .auth import Credentials, TokenServer, htpasswd_auth
from .proxy_app import ProxyUnderTest, StartedProxies, serve_proxy
from .recording import PassThrough
from .registry import Registry
from .skopeo import Skopeo

ANON_ALIAS = "anon.registry.test"
BASIC_PASSWORD_ENV = "RP_TEST_BASIC_PASSWORD"


@dataclass
class Upstream:
    """One real upstream as the proxy sees it (through its pass-through)."""

    name: str
    registry: Registry
    passthrough: PassThrough
    credentials: Credentials | None = None

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT`` of the pass-through: the upstream's URL host in the proxy's
        settings, so also the ``ns`` that routes to it."""
        return self.passthrough.host

    @property
    def url(self) -> str:
        return self.passthrough.url

    async def push(
        self, skopeo: Skopeo, image: oci.OciImage | oci.OciIndex, repo: str, tag: str
    ) -> None:
        """Push an OCI layout straight into the registry, as it is (no format change)."""
        await skopeo.push(
            image.oci_ref,
            self.registry.host,
            repo,
            tag,
            all_images=isinstance(image, oci.OciIndex),
            creds=self.credentials.colon if self.credentials is not None else None,
        )


def upstream_entry(upstream: Upstream, **extra: Any) -> dict[str, Any]:
    return {"name": upstream.name, "url": upstream.url, **extra}


@dataclass
class World:
    anon: Upstream
    basic: Upstream
    tok: Upstream
    token_server: TokenServer
    workdir: Path
    proxy: ProxyUnderTest = field(init=False)
    _proxies: StartedProxies = field(default_factory=StartedProxies)

    @property
    def upstreams(self) -> tuple[Upstream, Upstream, Upstream]:
        return self.anon, self.basic, self.tok

    def secrets(self) -> list[str]:
        """Every credential the proxy holds or was given: passwords, Basic header values
        and each token the token server issued so far."""
        found: list[str] = []
        for upstream in self.upstreams:
            if upstream.credentials is not None:
                found.extend(upstream.credentials.secrets())
        found.extend(self.token_server.issued)
        return found

    def clear_logs(self) -> None:
        for upstream in self.upstreams:
            upstream.passthrough.log.clear()
        self.token_server.requests.clear()

    async def start_proxy(
        self,
        *,
        basic: Mapping[str, Any] | None = None,
        tok: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        extra_upstreams: list[dict[str, Any]] | None = None,
        visibility: str | None = "public",
        settings: Mapping[str, Any] | None = None,
    ) -> ProxyUnderTest:
        """A proxy in front of all three upstreams; ``basic``/``tok`` override keys of
        those upstreams' entries, ``environ`` what ``password_env`` reads, ``settings``
        top-level keys (``auth``, ``access``, ``limits``...).

        ``settings["cache"]`` adds keys to the cache section (``redis``).

        ``visibility`` of the two private upstreams: ``public`` by default, the operator's
        explicit "serve what the proxy's credentials fetch to everyone", which the tests
        of routing and formats assume; None leaves the secure default (``auto``), which
        the access-control tests test."""
        assert self.basic.credentials is not None and self.tok.credentials is not None
        shown = {"visibility": visibility} if visibility is not None else {}
        entries = [
            upstream_entry(self.anon, aliases=[ANON_ALIAS], default=True),
            {
                **upstream_entry(
                    self.basic,
                    username=self.basic.credentials.username,
                    password_env=BASIC_PASSWORD_ENV,
                    **shown,
                ),
                **(basic or {}),
            },
            {
                **upstream_entry(
                    self.tok,
                    username=self.tok.credentials.username,
                    password=self.tok.credentials.password,
                    **shown,
                ),
                **(tok or {}),
            },
            *(extra_upstreams or []),
        ]
        cache_dir = self.workdir / f"proxy-cache-{len(self._proxies)}"
        mapping = {
            "listen": "127.0.0.1:0",
            "log_level": "debug",
            "upstreams": entries,
            **(settings or {}),
        }
        mapping["cache"] = {"dir": str(cache_dir), **(settings or {}).get("cache", {})}
        if environ is None:
            environ = {BASIC_PASSWORD_ENV: self.basic.credentials.password}
        return await self._proxies.add(serve_proxy(mapping, environ=environ))

    async def close_proxies(self) -> None:
        await self._proxies.stop()


@contextlib.asynccontextmanager
async def running_world(workdir: Path, binary: str) -> AsyncIterator[World]:
    """Token server, three registries, their pass-throughs and a proxy over all three;
    everything stopped again (registries by PID) on the way out."""
    basic_creds = Credentials.random("basic-user")
    tok_creds = Credentials.random("tok-user")
    async with contextlib.AsyncExitStack() as stack:
        token_server = await stack.enter_async_context(
            TokenServer(workdir / "token", {tok_creds.username: tok_creds.password})
        )

        anon_registry = Registry(workdir / "anon", binary=binary)
        basic_registry = Registry(
            workdir / "basic",
            binary=binary,
            extra=htpasswd_auth(
                workdir / "basic-auth", {basic_creds.username: basic_creds.password}
            ),
        )
        tok_registry = Registry(workdir / "tok", binary=binary, extra=token_server.registry_auth())
        upstreams: list[Upstream] = []
        for name, registry, creds in (
            ("anon", anon_registry, None),
            ("basic", basic_registry, basic_creds),
            ("tok", tok_registry, tok_creds),
        ):
            stack.enter_context(registry)
            passthrough = await stack.enter_async_context(PassThrough(registry.url))
            upstreams.append(Upstream(name, registry, passthrough, creds))

        world = World(upstreams[0], upstreams[1], upstreams[2], token_server, workdir)
        stack.push_async_callback(world.close_proxies)
        world.proxy = await world.start_proxy()
        yield world
