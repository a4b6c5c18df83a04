"""Composition root: builds the object graph from settings and wires the routes.

Resources open in order and close in reverse through ``cleanup_ctx``: the pull-through
registry (disk store, upstream sessions, in-flight fetches).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy import __version__, metrics
from proxy.access.control import AccessControl
from proxy.api import handlers, peer
from proxy.api.accesslog import AccessLogger
from proxy.api.connections import ConnectionGuard, GuardedAppRunner, raise_open_files_limit
from proxy.api.middlewares import MIDDLEWARES, on_response_prepare
from proxy.pullthrough.registry import PullThroughRegistry
from proxy.pullthrough.warm import PinRefresher
from proxy.routing import Router
from proxy.settings import Settings
from proxy.workers import MULTIPROC_ENV, WorkerRole

CLIENT_MAX_SIZE = 1 << 20


def create_app(settings: Settings, worker: WorkerRole | None = None) -> web.Application:
    """The main application; ``worker``: one of ``settings.workers`` processes."""
    metrics.BUILD_INFO.info({"version": __version__})
    app = web.Application(middlewares=MIDDLEWARES, client_max_size=CLIENT_MAX_SIZE)
    registry = PullThroughRegistry(settings)
    router = Router(settings.upstreams)
    access = AccessControl(
        settings, router, lambda name: registry.upstreams[name].client, registry.redis
    )
    app[handlers.REGISTRY_KEY] = registry
    app[handlers.ROUTER_KEY] = router
    app[handlers.ACCESS_KEY] = access
    refresher = PinRefresher(registry, settings.pin_refresh or 0.0)
    app[handlers.PIN_REFRESHER_KEY] = refresher
    if worker is not None:
        app[handlers.METRICS_REGISTRY_KEY] = worker_metrics()
        registry.worker = worker

    async def registry_ctx(_app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        sampler: asyncio.Task[None] | None = None
        if worker is None:
            metrics.ASYNCIO_TASKS.set_function(lambda: len(asyncio.all_tasks(loop)))
        else:  # a function gauge is not seen by the other workers: sample it
            sampler = asyncio.create_task(_sample_tasks(), name="sample-tasks")
        await registry.open()
        await asyncio.to_thread(access.open)
        if settings.pin_refresh is not None and settings.pin:
            # Workers: the one doing maintenance refreshes the pins (proxy.storage.maintenance).
            registry.maintenance_task(refresher.start, refresher.close)
        yield
        if sampler is not None:
            sampler.cancel()
        await refresher.close()
        await access.close()
        await registry.close()

    app.cleanup_ctx.append(registry_ctx)
    app.on_response_prepare.append(on_response_prepare)
    app.router.add_get("/v2/", handlers.base)
    app.router.add_route("*", "/v2/{tail:.+}", handlers.dispatch)
    app.router.add_get("/metrics", handlers.metrics_endpoint)
    app.router.add_get("/healthz", handlers.healthz)
    app.router.add_get("/readyz", handlers.readyz)
    app.router.add_route("GET", "/token", handlers.token)
    app.router.add_route("POST", "/token", handlers.token)
    app.router.add_get("/admin/usage", handlers.admin_usage)
    app.router.add_get("/admin/cache/stats", handlers.admin_cache_stats)
    app.router.add_get("/admin/cache/images", handlers.admin_cache_images)
    app.router.add_post("/admin/cache/evict", handlers.admin_cache_evict)
    app.router.add_post("/admin/cache/gc", handlers.admin_cache_gc)
    app.router.add_post("/admin/cache/verify", handlers.admin_cache_verify)
    app.router.add_post("/admin/cache/prewarm", handlers.admin_cache_prewarm)
    app.router.add_get("/_cluster/blobs/{digest}", peer.peer_blob, allow_head=False)
    app.router.add_route("*", "/_cluster/{tail:.*}", peer.other)
    return app


def connection_guard(settings: Settings) -> ConnectionGuard:
    """The client-connection policy of the main listener (``server.*`` settings)."""
    return ConnectionGuard(
        header_timeout=settings.header_timeout,
        keepalive_timeout=settings.keepalive_timeout,
        send_timeout=settings.send_timeout,
        max_connections=settings.max_connections,
    )


def create_runner(app: web.Application, settings: Settings, **kwargs: object) -> web.AppRunner:
    """The main listener's runner: aiohttp's, with the connection guard in its protocol."""
    return GuardedAppRunner(app, connection_guard(settings), **kwargs)


TASK_SAMPLE_INTERVAL = 5.0


async def _sample_tasks() -> None:
    while True:
        metrics.ASYNCIO_TASKS.set(len(asyncio.all_tasks()))
        await asyncio.sleep(TASK_SAMPLE_INTERVAL)


def worker_metrics() -> CollectorRegistry:
    """Workers: /metrics renders every worker's samples (the supervisor's directory)."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        raise RuntimeError(f"a worker needs {MULTIPROC_ENV} (set by the supervisor)")
    return metrics.multiprocess_registry(path)


def create_metrics_app(worker: WorkerRole | None = None) -> web.Application:
    """/metrics (and /healthz) alone, for a separate scrape address."""
    app = web.Application()
    if worker is not None:
        app[handlers.METRICS_REGISTRY_KEY] = worker_metrics()
    app.router.add_get("/metrics", handlers.metrics_endpoint)
    app.router.add_get("/healthz", handlers.healthz)
    return app


async def run(settings: Settings, *, worker: WorkerRole | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain (see below) and close resources in
    reverse. A ``worker`` binds its addresses with SO_REUSEPORT beside the other workers
    and tells the supervisor once it listens."""
    log = logging.getLogger("proxy")
    open_files = raise_open_files_limit()
    runners: list[web.AppRunner] = []
    main = create_app(settings, worker)
    sites = [(main, settings.listen_host, settings.listen_port)]
    if settings.metrics_listen is not None:
        sites.append((create_metrics_app(worker), *settings.metrics_listen))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for app, host, port in sites:
            runner: web.AppRunner
            if app is main:
                guarded = GuardedAppRunner(
                    app,
                    connection_guard(settings),
                    access_log_class=AccessLogger,
                    handle_signals=False,
                    shutdown_timeout=settings.shutdown_grace,
                )
                guarded.guard.install(loop)
                log.info(
                    "at most %d client connections (open files limit %d)",
                    guarded.guard.max_connections,
                    open_files,
                )
                runner = guarded
            else:
                runner = web.AppRunner(
                    app,
                    access_log_class=AccessLogger,
                    handle_signals=False,
                    shutdown_timeout=settings.shutdown_grace,
                )
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port, reuse_port=worker is not None).start()
            log.info("listening on %s:%d", host, port)
        if worker is not None:
            worker.announce_ready()
        await stop.wait()
        # Unready and taking no new fetch leases; then (cleanup) the listeners close,
        # responses in flight get up to shutdown_grace, and fetches still running are
        # cancelled, which releases their leases so a follower takes over at once.
        log.info("shutting down: draining for up to %.0fs", settings.shutdown_grace)
        main[handlers.REGISTRY_KEY].drain()
    finally:
        for runner in reversed(runners):
            await runner.cleanup()
