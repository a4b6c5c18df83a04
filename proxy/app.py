"""Composition root: builds the object graph from settings and wires the routes.

Resources open in order and close in reverse through ``cleanup_ctx``: the pull-through
registry (disk store, upstream sessions, in-flight fetches).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from proxy import __version__, metrics
from proxy.api import handlers
from proxy.api.middlewares import errors_middleware, metrics_middleware, on_response_prepare
from proxy.pullthrough.registry import PullThroughRegistry
from proxy.routing import Router
from proxy.settings import Settings

CLIENT_MAX_SIZE = 1 << 20


def create_app(settings: Settings) -> web.Application:
    metrics.BUILD_INFO.info({"version": __version__})
    app = web.Application(
        middlewares=[metrics_middleware, errors_middleware], client_max_size=CLIENT_MAX_SIZE
    )
    registry = PullThroughRegistry(settings)
    app[handlers.REGISTRY_KEY] = registry
    app[handlers.ROUTER_KEY] = Router(settings.upstreams)

    async def registry_ctx(_app: web.Application) -> AsyncIterator[None]:
        await registry.open()
        yield
        await registry.close()

    app.cleanup_ctx.append(registry_ctx)
    app.on_response_prepare.append(on_response_prepare)
    app.router.add_get("/v2/", handlers.base)
    app.router.add_route("*", "/v2/{tail:.+}", handlers.dispatch)
    app.router.add_get("/metrics", handlers.metrics_endpoint)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    return app
