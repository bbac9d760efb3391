"""Fault suite: start-up of the embedded default, with real ``llm-proxy serve`` and ``demo``
processes, real ``redis-server`` children and data that takes Redis a while to load.

A Redis restarted with a few MB of AOF answers LOADING to every command for a moment. These
tests check the order start-up keeps — Redis loaded, then the bootstrap key, then the port,
then "listening" — and what surrounds it: one process per data directory, demo keys that end
with the demo, and no child (Redis, workers) outliving a killed parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import openai
import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, REPO, eventually, write_config
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy.app import BOOTSTRAP_KEY_ID, BOOTSTRAP_ORG
from proxy.ledger.api_keys import KeyCreate, KeyStore, digest
from proxy.store.embedded_redis import EmbeddedRedis, find_redis_server, free_port

pytestmark = [pytest.mark.slow, pytest.mark.redis]

OLD_ADMIN_KEY = "sk-test-admin-old-0123456789"
NEW_ADMIN_KEY = ADMIN_KEY
FILLER_COMMANDS = 600_000
"""Small SETs, replayed one by one at start: ~45 MB of AOF, about half a second of LOADING."""


# --- data that takes a while to load -----------------------------------------------------------


def _fill(url: str, commands: int) -> None:
    """Writes ``commands`` small SETs over one raw connection (redis-py is 10x slower here)."""
    host, port = url.split("//")[1].split("/")[0].split(":")
    value = b"v" * 40
    payload = b"".join(
        b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$40\r\n%s\r\n" % (len(key), key, value)
        for key in (b"filler:%d" % i for i in range(commands))
    )
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(payload)
        expected, received = len(b"+OK\r\n") * commands, 0
        while received < expected:
            chunk = sock.recv(1 << 20)
            assert chunk, "redis closed the connection"
            received += len(chunk)


async def _register_old_admin_key(url: str) -> None:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        await KeyStore(client).create(
            KeyCreate(name="bootstrap admin", role="cluster_admin"),
            BOOTSTRAP_ORG,
            plaintext=OLD_ADMIN_KEY,
            key_id=BOOTSTRAP_KEY_ID,
        )
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def loading_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory whose AOF holds the old admin key and ~45 MB of filler, checked to
    make a fresh Redis answer LOADING at first (else the tests on it would test nothing)."""
    data_dir = tmp_path_factory.mktemp("loading") / "data"
    with EmbeddedRedis(data_dir) as server:
        asyncio.run(_register_old_admin_key(server.url))
        _fill(server.url, FILLER_COMMANDS)
    assert _loads_slowly(data_dir), "the filler data loads too fast to test anything"
    return data_dir


@pytest.fixture
def data_dir(loading_data: Path, tmp_path: Path) -> Path:
    """A copy of the slow-loading data, for one test to start on."""
    copy = tmp_path / "data"
    shutil.copytree(loading_data, copy, ignore=shutil.ignore_patterns("*.lock", "redis.log"))
    return copy


def _loads_slowly(data_dir: Path) -> bool:
    """Whether a fresh Redis on this data answers LOADING at first (else the tests below
    would pass without testing anything)."""
    copy = data_dir.parent / "probe"
    shutil.copytree(data_dir, copy)
    port = free_port()
    process = subprocess.Popen(
        [
            find_redis_server(),
            "--port",
            str(port),
            "--dir",
            str(copy),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(copy / "redis.log"),
        ]
    )
    try:
        client = redis.Redis(
            port=port, socket_timeout=2, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return False
            except redis.BusyLoadingError:
                return True
            except redis.ConnectionError:
                time.sleep(0.01)
        return False
    finally:
        process.terminate()
        process.wait()
        shutil.rmtree(copy, ignore_errors=True)


# --- processes -------------------------------------------------------------------------------


class Running:
    """``python -m proxy ...`` with its output in a file (a pipe would stay open as long as
    any child that inherited it lives — exactly what some of these tests are about)."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log
        self.seen: set[tuple[int, str]] = set()
        """Children seen so far: killed at the end of the test if they outlived it."""

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    @property
    def lines(self) -> list[str]:
        return self.output.splitlines()

    async def until(self, pattern: str, within: float = 30) -> re.Match[str]:
        """The first output line matching ``pattern``; fails if the process ends first."""
        deadline = time.monotonic() + within
        while True:
            ended = self.process.poll() is not None
            found = re.search(pattern, self.output, re.MULTILINE)
            if found:
                return found
            if ended:
                raise AssertionError(f"exited ({self.process.returncode}):\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matching {pattern!r}:\n{self.output}")
            await asyncio.sleep(0.01)

    async def exit_code(self, within: float = 20) -> int:
        return await asyncio.to_thread(self.process.wait, within)

    def descendants(self) -> list[int]:
        found = _descendants(self.process.pid)
        self.seen.update((pid, _start_time(pid)) for pid in found)
        return found


def _start_time(pid: int) -> str:
    """With the pid, identifies a process (a pid alone may be reused)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except OSError:
        return ""


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            found.append(int(child))
            found += _descendants(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _redis_servers_on(data_dir: Path) -> list[int]:
    """Running redis-server (or Valkey's valkey-server) processes working in ``data_dir``
    (Redis chdirs to --dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() not in ("redis-server", "valkey-server"):
                continue
            if Path(os.readlink(entry / "cwd")) == data_dir.resolve() and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


Launch = Callable[..., Awaitable[Running]]


@pytest.fixture
async def launch(tmp_path: Path) -> AsyncIterator[Launch]:
    """Starts CLI processes; at the end kills whatever they left (by pid)."""
    started: list[Running] = []

    async def start(*args: str, env: dict[str, str] | None = None) -> Running:
        log = tmp_path / f"process-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "proxy", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                cwd=str(tmp_path),
            )
        running = Running(process, log)
        started.append(running)
        return running

    yield start
    for running in started:
        running.descendants()
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
        for pid, started_at in running.seen:
            if started_at and _start_time(pid) == started_at:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def config(tmp_path: Path, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Embedded Redis (no URL), the mock as upstream, the new admin key in the environment."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", NEW_ADMIN_KEY)
    return write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), "")


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    return {"PROXY__REDIS__DATA_DIR": str(data_dir), **extra}


async def _status(url: str, path: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(url + path, headers=headers) as response:
            return response.status


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


# --- Redis loaded, then the bootstrap key, then the port -------------------------------------


def test_embedded_redis_starts_only_once_its_data_is_loaded(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING"), EmbeddedRedis(data_dir) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping() is True  # no LOADING: start() waited
        assert client.get("filler:0") == b"v" * 40
        client.close()
    assert "waiting for Redis to load its data" in caplog.text


@pytest.mark.parametrize("workers", [1, 2])
async def test_serve_waits_for_redis_to_load_then_bootstraps_then_listens(
    launch: Launch, config: Path, data_dir: Path, workers: int
) -> None:
    """The admin key was rotated (old key in the data, new key in the environment). The
    moment serve says it listens, it is ready, the new key works and the old one is gone."""
    port = free_port()
    serve = await launch(
        "--config",
        str(config),
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        env=_env(data_dir),
    )
    await serve.until(r"llm-proxy listening on")
    url = f"http://127.0.0.1:{port}"
    assert await _status(url, "/readyz") == 200
    assert await _status(url, "/api/v1/keys", NEW_ADMIN_KEY) == 200
    assert await _status(url, "/api/v1/keys", OLD_ADMIN_KEY) == 401
    lines = serve.lines
    waiting = next(i for i, line in enumerate(lines) if "waiting for Redis to load" in line)
    listening = next(i for i, line in enumerate(lines) if "listening" in line)
    assert waiting < listening, serve.output
    serve.process.send_signal(signal.SIGTERM)
    assert await serve.exit_code() == 0, serve.output


async def test_serve_fails_loudly_when_redis_never_becomes_ready(
    launch: Launch, config: Path, tmp_path: Path
) -> None:
    """A configured Redis that never answers: a bounded wait, one clear line, exit 1."""
    nowhere = free_port()
    serve = await launch(
        "--config",
        str(config),
        "serve",
        "--port",
        str(free_port()),
        env={
            "REDIS_URL": f"redis://127.0.0.1:{nowhere}/0",
            "PROXY__REDIS__STARTUP_WAIT_SECONDS": "1",
        },
    )
    started = time.monotonic()
    assert await serve.exit_code(within=30) == 1, serve.output
    assert time.monotonic() - started < 20
    assert f"waiting for Redis at 127.0.0.1:{nowhere}" in serve.output
    assert re.search(
        r"cannot start: Redis at 127\.0\.0\.1:\d+ was not ready within 1 s", serve.output
    )
    assert "listening" not in serve.output
    assert "Traceback" not in serve.output


# --- one process per data directory ----------------------------------------------------------


async def test_a_second_serve_on_the_same_data_dir_is_refused_naming_the_holder(
    launch: Launch, config: Path, tmp_path: Path
) -> None:
    data_dir = tmp_path / "shared"
    first = await launch(
        "--config", str(config), "serve", "--port", str(free_port()), env=_env(data_dir)
    )
    await first.until("listening")
    second = await launch(
        "--config", str(config), "serve", "--port", str(free_port()), env=_env(data_dir)
    )
    assert await second.exit_code() == 1, second.output
    assert f"the data directory {data_dir.resolve()} is in use by pid {first.process.pid}" in (
        second.output
    )
    assert "serve" in second.output.split("in use by", 1)[1]
    assert len(_redis_servers_on(data_dir)) == 1
    first.process.send_signal(signal.SIGTERM)
    assert await first.exit_code() == 0, first.output


async def test_demo_beside_serve_leaves_serves_data_alone(
    launch: Launch, config: Path, tmp_path: Path
) -> None:
    """Same configuration, same data directory: the demo runs on its own private Redis, and
    its key never reaches serve's data."""
    data_dir = tmp_path / "shared"
    port = free_port()
    serve = await launch("--config", str(config), "serve", "--port", str(port), env=_env(data_dir))
    await serve.until("listening")
    demo_port = free_port()
    demo = await launch(
        "--config", str(config), "demo", "--port", str(demo_port), env=_env(data_dir)
    )
    key = (await demo.until(r'api_key="(sk-bp-[^"]+)"')).group(1)
    await _chat(demo_port, key)
    assert len(_redis_servers_on(data_dir)) == 1  # serve's own, no second one
    demo.process.send_signal(signal.SIGTERM)
    assert await demo.exit_code() == 0, demo.output
    assert await _status(f"http://127.0.0.1:{port}", "/v1/models", key) == 401
    redis_port = int((await serve.until(r"embedded redis-server on redis://[\d.]+:(\d+)")).group(1))
    client = redis.Redis(port=redis_port)
    assert client.exists(f"bp:kd:{digest(key)}") == 0
    assert list(client.scan_iter("bp:{o:demo}:*")) == []
    client.close()
    serve.process.send_signal(signal.SIGTERM)
    assert await serve.exit_code() == 0, serve.output


async def _chat(port: int, key: str) -> None:
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0
    ) as client:
        answer = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
        )
    assert answer.choices[0].message.content


# --- demo keys end with the demo --------------------------------------------------------------


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_demo_keys_do_not_outlive_the_demo(
    launch: Launch, config: Path, data_dir: Path, stop: signal.Signals
) -> None:
    """The demo pointed at serve's (slow-loading) data directory: it starts, its key works,
    and once it is stopped — even killed — the key exists nowhere."""
    demo_port = free_port()
    demo = await launch(
        "--config", str(config), "demo", "--port", str(demo_port), env=_env(data_dir)
    )
    key = (await demo.until(r'api_key="(sk-bp-[^"]+)"')).group(1)
    await _chat(demo_port, key)
    children = demo.descendants()
    assert children, "the demo's redis-server"
    demo.process.send_signal(stop)
    await demo.exit_code()
    await eventually(
        lambda: _true(not any(_alive(pid) for pid in children)),
        what="the demo's children to exit",
    )
    with EmbeddedRedis(data_dir) as server:  # the data directory serve would use
        client = redis.Redis.from_url(server.url)
        assert client.exists(f"bp:kd:{digest(key)}") == 0
        assert list(client.scan_iter("bp:{o:demo}:*")) == []
        client.close()


async def test_demo_listens_on_the_configured_port(
    launch: Launch, config: Path, tmp_path: Path
) -> None:
    port = free_port()
    demo = await launch(
        "--config", str(config), "demo", env=_env(tmp_path / "d", PROXY__SERVER__PORT=str(port))
    )
    key = (await demo.until(r'api_key="(sk-bp-[^"]+)"')).group(1)
    assert f"running on http://127.0.0.1:{port}" in demo.output
    await _chat(port, key)
    demo.process.send_signal(signal.SIGTERM)
    assert await demo.exit_code() == 0, demo.output


# --- children end with their parent -----------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_killed_serve_leaves_no_redis_and_no_worker_behind(
    launch: Launch, config: Path, tmp_path: Path, workers: int
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    serve = await launch(
        "--config",
        str(config),
        "serve",
        "--port",
        str(port),
        "--workers",
        str(workers),
        env=_env(data_dir),
    )
    await serve.until("listening")
    children = serve.descendants()
    redis_pids = _redis_servers_on(data_dir)
    assert len(redis_pids) == 1 and redis_pids[0] in children
    serve.process.send_signal(signal.SIGKILL)
    await serve.exit_code()
    await eventually(
        lambda: _true(not any(_alive(pid) for pid in children)),
        what="redis-server and the workers to exit with their parent",
    )
    assert _refused(port)
    # Nothing is left holding the data directory: the next serve starts at once.
    again = await launch(
        "--config", str(config), "serve", "--port", str(free_port()), env=_env(data_dir)
    )
    await again.until("listening")
    again.process.send_signal(signal.SIGTERM)
    assert await again.exit_code() == 0, again.output


async def _true(value: bool) -> bool:
    return value
