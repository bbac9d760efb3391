"""Running the proxy: the embedded Redis, N worker processes on one port, graceful shutdown.

With several workers the parent owns the embedded Redis and the children share the port via
``SO_REUSEPORT``; the parent stops Redis only after every child has finished its shutdown,
so in-flight requests can still settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

from aiohttp import web

from proxy.app import create_app
from proxy.config import Settings
from proxy.store.embedded_redis import EmbeddedRedis

log = logging.getLogger(__name__)


def use_uvloop(enabled: bool) -> None:
    if not enabled:
        return
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@contextlib.contextmanager
def redis_url_for(settings: Settings) -> Iterator[str]:
    """Yields the Redis URL: the configured one, or that of an embedded server we own."""
    if settings.redis.url:
        yield settings.redis.url
        return
    embedded = EmbeddedRedis(Path(settings.redis.data_dir).resolve())
    embedded.start()
    log.info("embedded redis-server on %s (data in %s)", embedded.url, settings.redis.data_dir)
    try:
        yield embedded.url
    finally:
        embedded.stop()


async def wait_for_stop_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


@contextlib.asynccontextmanager
async def running_site(
    app: web.Application, host: str, port: int, *, reuse_port: bool, grace: float
) -> AsyncIterator[web.AppRunner]:
    # Handler cancellation: a client that goes away cancels its handler wherever it waits (a
    # silent upstream, its own full socket), so its upstream call and its slot end at once.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=grace, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port, shutdown_timeout=grace)
    await site.start()
    try:
        yield runner
    finally:
        await runner.cleanup()


async def serve_worker(
    settings: Settings,
    redis_url: str,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[web.AppRunner], Awaitable[None]] | None = None,
) -> None:
    app = create_app(settings, redis_url)
    grace = settings.server.shutdown_grace_seconds
    async with running_site(app, host, port, reuse_port=reuse_port, grace=grace) as runner:
        freeze_startup_objects()
        if on_ready is not None:
            await on_ready(runner)
        await wait_for_stop_signal()
        log.info("stopping: no new connections; waiting up to %ss for requests", grace)


def freeze_startup_objects() -> None:
    """Keeps the garbage collector off what start-up built and never frees.

    Start-up leaves ~60,000 long-lived objects (modules, the price database, the app); every
    full collection traversed them all: 20-50 ms pauses under load, with every request in
    flight waiting them out (they were the p99 of the benchmark's paced run). Frozen objects
    are never scanned again.
    """
    gc.collect()
    gc.freeze()


def _worker_main(settings: Settings, redis_url: str, host: str, port: int, log_level: int) -> None:
    """Runs in a fresh (spawned) interpreter: the parent's logging setup must be redone."""
    logging.basicConfig(level=log_level, format="%(message)s")
    use_uvloop(settings.server.uvloop)
    asyncio.run(serve_worker(settings, redis_url, host, port, reuse_port=True))


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    with redis_url_for(settings) as redis_url:
        print(f"llm-proxy listening on http://{host}:{port} ({workers} worker(s))", flush=True)
        if workers == 1:
            use_uvloop(settings.server.uvloop)
            asyncio.run(serve_worker(settings, redis_url, host, port, reuse_port=False))
            return
        # Workers write metrics to a shared directory so any worker's /metrics covers all.
        metrics_dir = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
        os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
        context = multiprocessing.get_context("spawn")
        children = [
            context.Process(
                target=_worker_main,
                args=(settings, redis_url, host, port, logging.getLogger().level),
            )
            for _ in range(workers)
        ]
        for child in children:
            child.start()

        def forward(signum: int, _frame: object) -> None:
            for child in children:
                if child.pid is not None and child.is_alive():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child.pid, signum)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        for child in children:
            child.join()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        failed = [c.exitcode for c in children if c.exitcode not in (0, -signal.SIGTERM)]
        if failed:
            sys.exit(1)
