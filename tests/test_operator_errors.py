"""Start-up and configuration mistakes an operator makes on day one, each said in one line
that names the problem and what to do (issue 23, item 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from conftest import REPO, start_proxy_process, write_config
from helpers import user_messages

from proxy.store.embedded_redis import free_port

pytestmark = pytest.mark.slow  # processes of their own


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("command", ["demo", "serve", "mock-upstream"])
def test_a_busy_port_is_one_line_and_a_non_zero_exit_within_5_s(
    command: str, busy_port: int, tmp_path: Path
) -> None:
    """Without a TTY (stdin from /dev/null), as under a service manager or CI."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "proxy", command, "--host", "127.0.0.1", "--port", str(busy_port)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(REPO), "PROXY__REDIS__DATA_DIR": str(tmp_path)},
        cwd=str(tmp_path),
    )
    elapsed = time.monotonic() - started
    err = done.stderr.decode()
    assert done.returncode != 0
    assert elapsed < 5, elapsed
    assert "Traceback" not in err, err
    problem = [line for line in err.splitlines() if "cannot start" in line]
    assert len(problem) == 1, err
    assert f"port {busy_port}" in problem[0] and "already in use" in problem[0]
    assert f"llm-proxy {command} --port" in problem[0]  # what to do


async def test_an_unset_credential_variable_is_warned_at_start_and_refused_by_name(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> None:
    variable = "LLM_PROXY_TEST_NEVER_SET_KEY"
    assert variable not in os.environ
    tail = "\n".join(
        [
            "[[upstreams]]",
            'name = "keyless"',
            f'base_url = "{mock_upstream.make_url("/v1")}"',
            f'api_key_env = "{variable}"',
            "[[models]]",
            'name = "gpt-4o"',
            'upstream = "keyless"',
        ]
    )
    config = write_config(
        tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url, tail
    )
    errors = tmp_path / "stderr.log"
    proxy = await start_proxy_process(config, tmp_path / "stdout.log", errors=errors)
    try:
        async with aiohttp.ClientSession() as session:
            key = await _key(session, proxy.url)
            body = {"model": "gpt-4o", "messages": user_messages("hi")}
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(
                proxy.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                refused = await response.json()
                assert response.status == 503, refused
            assert refused["error"]["code"] == "upstream_credential_missing"
            assert variable in refused["error"]["message"]
            body["model"] = "gpt-4o-mini"  # another upstream is not affected
            async with session.post(
                proxy.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status == 200
    finally:
        proxy.stop()
    logged = errors.read_text()
    warned = [line for line in logged.splitlines() if variable in line]
    assert warned and "keyless" in warned[0] and "not set" in warned[0], logged
    assert f"configuration: {config.resolve()}" in logged, logged


async def _key(session: aiohttp.ClientSession, url: str) -> str:
    from conftest import ADMIN_KEY

    async with session.post(
        url + "/api/v1/keys",
        json={"name": "t", "org_id": "acme"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ) as response:
        created = await response.json()
        assert response.status == 201, created
        key: str = created["key"]
        return key


def test_the_port_check_itself() -> None:
    from proxy.port_check import PortInUse, check_port_free

    check_port_free("127.0.0.1", free_port(), "serve")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(PortInUse, match="already in use"):
            check_port_free("127.0.0.1", holder.getsockname()[1], "serve")


async def test_a_bind_that_loses_the_race_still_cleans_the_app_up() -> None:
    """The trial bind can lose a race; the real bind failing then must clean the started app
    up (its background tasks), or ``asyncio.run`` waits on them forever (the demo's hang)."""
    from aiohttp import web

    from proxy.serving import running_site

    app = web.Application()
    cleaned: list[bool] = []

    async def cleanup(_app: web.Application) -> None:
        cleaned.append(True)

    app.on_cleanup.append(cleanup)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError):
            async with running_site(app, "127.0.0.1", port, reuse_port=False, grace=1):
                pass
    assert cleaned == [True]
