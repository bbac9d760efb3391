"""Running the proxy: the embedded Redis, N worker processes on one port, graceful shutdown.

With several workers the parent owns the embedded Redis and the children share the port via
``SO_REUSEPORT``; the parent stops Redis only after every child has finished its shutdown,
so in-flight requests can still settle.

Start-up runs in a fixed order, so that the first request finds everything in place: lock the
data directory (embedded Redis), start Redis and wait until it has loaded its data, load the
scripts and write the bootstrap admin key, bind the port — and only then say "listening".
Workers and the embedded Redis end with the process that started them, even if it is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.app import create_app, prepare_store
from proxy.config import Settings
from proxy.gateway.request_log import configure_logging
from proxy.http_protocol import ConnectionLimits, GuardedAppRunner
from proxy.process_lifetime import die_with_parent
from proxy.store.connection import connect
from proxy.store.data_dir import DataDirLock
from proxy.store.embedded_redis import EmbeddedRedis, find_redis_server
from proxy.store.server_info import running_version
from proxy.tls import reload_tls, tls_context

log = logging.getLogger(__name__)


def use_uvloop(enabled: bool) -> None:
    if not enabled:
        return
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


@contextlib.contextmanager
def redis_url_for(settings: Settings) -> Iterator[str]:
    """Yields the Redis URL: the configured one, or that of an embedded server we own, on a
    data directory we hold locked (``DataDirInUse`` names the process that holds it)."""
    if settings.redis.url:
        yield settings.redis.url
        return
    data_dir = Path(settings.redis.data_dir).resolve()
    lock = DataDirLock.acquire(data_dir)
    try:
        # Redis inherits the lock: the directory stays locked until Redis, too, has exited.
        # The log names the binary and the version that runs: people start the proxy on
        # whichever redis-server is first on PATH (Debian's 7.x, the bundled 6.2, Valkey).
        binary = find_redis_server()
        embedded = EmbeddedRedis(data_dir, binary=binary, keep_fds=(lock.fd,))
        embedded.start(timeout=settings.redis.startup_wait_seconds)
        if embedded.pid is not None:
            lock.note_child("redis", embedded.pid)
        log.info(
            "embedded redis-server on %s (data in %s): %s, %s",
            embedded.url,
            data_dir,
            running_version(embedded.url),
            binary,
        )
        try:
            yield embedded.url
        finally:
            embedded.stop()
    finally:
        lock.release()


@contextlib.contextmanager
def private_redis(settings: Settings) -> Iterator[str]:
    """An embedded Redis that keeps nothing: in memory, in a temporary directory removed at
    the end. Whatever is written to it (the demo's key) cannot outlive the process, not even
    a SIGKILL (Redis dies with its parent and never wrote to disk)."""
    data_dir = Path(tempfile.mkdtemp(prefix="llm-proxy-demo-"))
    try:
        embedded = EmbeddedRedis(data_dir, persist=False)
        embedded.start(timeout=settings.redis.startup_wait_seconds)
        try:
            yield embedded.url
        finally:
            embedded.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@contextlib.contextmanager
def stop_signals() -> Iterator[asyncio.Event]:
    """SIGINT and SIGTERM set the event (a graceful stop) for as long as this lasts. Installed
    before a process says it listens: a signal right after that must not find the default
    action (an abrupt exit) still in place."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        yield stop
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


LISTEN_BACKLOG = 1024
"""Handshakes the kernel completes while the loop is busy, before it accepts them (the kernel
caps it at net.core.somaxconn). aiohttp's 128 made a burst of connections beyond it wait for
SYN retries (1 s, 3 s, ...): slow to connect under load, and unfair to whoever came last."""


@contextlib.asynccontextmanager
async def running_site(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    grace: float,
    limits: ConnectionLimits | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[web.AppRunner]:
    """``limits``: serve through ``GuardedAppRunner`` (the proxy); None: a plain runner.
    Handler cancellation: a client that goes away cancels its handler wherever it waits (a
    silent upstream, its own full socket), so its upstream call and its slot end at once."""
    runner = (
        GuardedAppRunner(
            app, limits, access_log=None, shutdown_timeout=grace, handler_cancellation=True
        )
        if limits is not None
        else web.AppRunner(app, access_log=None, shutdown_timeout=grace, handler_cancellation=True)
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        host,
        port,
        reuse_port=reuse_port,
        shutdown_timeout=grace,
        backlog=LISTEN_BACKLOG,
        ssl_context=ssl_context,
    )
    try:
        await site.start()
    except BaseException:
        # The app has started (its background tasks run): without its cleanup, a port in use
        # left them running and asyncio.run() waited on them forever (the demo hung).
        await runner.cleanup()
        raise
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
    limits = ConnectionLimits.of(settings.server)
    tls = tls_context(settings.server)
    async with running_site(
        app, host, port, reuse_port=reuse_port, grace=grace, limits=limits, ssl_context=tls
    ) as runner:
        freeze_startup_objects()
        if tls is not None:
            asyncio.get_running_loop().add_signal_handler(
                signal.SIGHUP, reload_tls, tls, settings.server
            )
        with stop_signals() as stop:
            if on_ready is not None:
                await on_ready(runner)
            await stop.wait()
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


def _worker_main(
    settings: Settings,
    redis_url: str,
    host: str,
    port: int,
    log_level: int,
    parent: int,
    ready: Any,
) -> None:
    """Runs in a fresh (spawned) interpreter: the parent's logging setup must be redone."""
    die_with_parent(parent)
    configure_logging(log_level)
    use_uvloop(settings.server.uvloop)

    async def bound(_runner: web.AppRunner) -> None:
        ready.send(os.getpid())
        ready.close()

    asyncio.run(serve_worker(settings, redis_url, host, port, reuse_port=True, on_ready=bound))


def _listening(host: str, port: int, workers: int, scheme: str = "http") -> None:
    print(f"llm-proxy listening on {scheme}://{host}:{port} ({workers} worker(s))", flush=True)


async def _prepare(settings: Settings, redis_url: str) -> None:
    redis = connect(settings.redis, redis_url)
    try:
        await prepare_store(settings, redis)
    finally:
        await redis.aclose()


def _scheme(settings: Settings) -> str:
    return "https" if settings.server.tls_cert else "http"


def _passed_on(children: list[Any]) -> Callable[[int, object], None]:
    """SIGHUP to the parent reaches every worker (each reloads its own TLS context)."""

    def pass_on(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    return pass_on


def serve(settings: Settings, host: str, port: int, workers: int) -> None:
    with redis_url_for(settings) as redis_url:
        if workers == 1:
            use_uvloop(settings.server.uvloop)

            async def bound(_runner: web.AppRunner) -> None:
                _listening(host, port, workers, _scheme(settings))

            asyncio.run(
                serve_worker(settings, redis_url, host, port, reuse_port=False, on_ready=bound)
            )
            return
        # Once here, not N times at once; a failure stops start-up before any worker runs.
        asyncio.run(_prepare(settings, redis_url))
        _serve_workers(settings, redis_url, host, port, workers)


def _serve_workers(settings: Settings, redis_url: str, host: str, port: int, workers: int) -> None:
    # Workers write metrics to a shared directory so any worker's /metrics covers all.
    metrics_dir = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", metrics_dir)
    context = multiprocessing.get_context("spawn")
    level = logging.getLogger().level
    children = []
    waiting: list[Any] = []  # one pipe per worker: it says when it has bound the port
    for _ in range(workers):
        receive, send = context.Pipe(duplex=False)
        child = context.Process(
            target=_worker_main, args=(settings, redis_url, host, port, level, os.getpid(), send)
        )
        child.start()
        send.close()
        children.append(child)
        waiting.append(receive)
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.pid is not None and child.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    if settings.server.tls_cert:
        signal.signal(signal.SIGHUP, _passed_on(children))
    broken = False
    while waiting and not stopping:
        for said in multiprocessing.connection.wait(waiting, timeout=0.2):
            waiting.remove(said)
            assert isinstance(said, multiprocessing.connection.Connection)
            try:
                said.recv()
            except EOFError:  # the worker ended before it could serve
                broken = True
            said.close()
        if broken:
            log.error("a worker exited before it could serve; stopping the others")
            forward(signal.SIGTERM, None)
    if not waiting and not stopping:
        _listening(host, port, workers, _scheme(settings))
    for child in children:
        child.join()
    shutil.rmtree(metrics_dir, ignore_errors=True)
    failed = [c.exitcode for c in children if c.exitcode not in (0, -signal.SIGTERM)]
    if failed or broken:
        sys.exit(1)
