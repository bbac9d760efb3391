"""``llm-proxy demo`` shows everything (issue 23, item 3): an admin key (minted, or the one in
``PROXY_ADMIN_KEY``), the key id the budget API needs, the console URL, and no warnings meant
for production."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import REPO

from proxy.store.embedded_redis import free_port

pytestmark = pytest.mark.slow  # a demo process of its own


async def _demo_printout(
    env: dict[str, str], port: int, cwd: Path
) -> tuple[str, asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--port",
        str(port),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=str(cwd),
    )
    assert process.stdout is not None
    printed = ""
    while "Press Ctrl-C" not in printed:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, f"demo exited early: {printed}"
        printed += line.decode()
    return printed, process


@pytest.mark.parametrize("given_admin_key", [None, "sk-operator-chosen-admin-key-123"])
async def test_the_demo_prints_an_admin_key_the_key_id_and_the_console(
    tmp_path: Path, given_admin_key: str | None
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PROXY_ADMIN_KEY", "REDIS_URL")}
    env.pop("PROXY_SECRET_KEY", None)
    env["PYTHONPATH"] = str(REPO)
    if given_admin_key is not None:
        env["PROXY_ADMIN_KEY"] = given_admin_key
    port = free_port()
    printed, process = await _demo_printout(env, port, tmp_path)
    try:
        admin = re.search(r"Admin key:\s+(\S+)", printed)
        key_id = re.search(r"key id (key_[0-9a-f]+)", printed)
        assert admin and key_id, printed
        if given_admin_key is not None:
            assert admin.group(1) == given_admin_key and "from PROXY_ADMIN_KEY" in printed
        console = f"http://127.0.0.1:{port}/ui"
        assert f"Console:    {console}" in printed
        assert f"budgets set apikey {key_id.group(1)}" in printed
        # No warning meant for production (plain-text webhook secrets and the like).
        assert "PROXY_SECRET_KEY" not in printed and "plain text" not in printed, printed
        headers = {"Authorization": f"Bearer {admin.group(1)}"}
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{port}/api/v1/keys/{key_id.group(1)}"
            async with session.get(url, headers=headers) as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["org_id"] == "demo"
            async with session.get(console) as response:
                assert response.status == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
