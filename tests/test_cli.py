"""``llm-proxy`` from the shell: help, refusing bad configs, key administration against a
running proxy, and ``serve`` with its embedded Redis on a fresh machine."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, REPO, Proxy, start_proxy_process, write_config
from helpers import chat_status, user_messages

from proxy.store.embedded_redis import free_port

MESSAGES = user_messages("hello")
HELLO = {"model": "gpt-4o-mini", "messages": MESSAGES}


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m proxy ARGS`` without blocking the event loop the in-process proxy runs on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=str(REPO),
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_help_lists_the_commands() -> None:
    code, out, _ = await run_cli("--help")
    assert code == 0
    for command in ("serve", "demo", "mock-upstream", "keys", "org-limits", "usage", "budgets"):
        assert command in out
    code, out, _ = await run_cli("keys", "create", "--help")
    assert code == 0
    for flag in ("--org", "--role", "--models", "--rpm", "--tpm", "--url", "--admin-key"):
        assert flag in out


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("[server]\nport = -1\n", "server.port"),
        ("[server]\nport = 8080\nworkerz = 2\n", "server.workerz"),
        ("[redis]\nsocket_timeout = 0\n", "redis.socket_timeout"),
    ],
)
async def test_serve_refuses_a_bad_config_naming_the_field(
    tmp_path: Path, section: str, field: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(section)
    code, out, err = await run_cli("--config", str(config), "serve")
    assert code != 0
    assert field in err, err
    assert "listening" not in out


async def test_serve_refuses_an_unpriced_model(tmp_path: Path) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path / "proxy.toml", "http://127.0.0.1:9/v1", dead_redis)
    config.write_text(config.read_text() + '[[models]]\nname = "in-house-7b"\nupstream = "mock"\n')
    code, _, err = await run_cli("--config", str(config), "serve", "--port", str(free_port()))
    assert code != 0
    assert "models.1.price" in err, err


async def test_serve_refuses_an_unpriced_model_cleanly(tmp_path: Path) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    config = write_config(tmp_path / "proxy.toml", "http://127.0.0.1:9/v1", dead_redis)
    config.write_text(config.read_text() + '[[models]]\nname = "in-house-7b"\nupstream = "mock"\n')
    code, out, err = await run_cli("--config", str(config), "serve", "--port", str(free_port()))
    assert (code, "listening" in out, "Traceback" in err) == (2, False, False), err
    assert "bad configuration" in err and "models.1.price" in err


@pytest.mark.slow  # runs the CLI in processes of its own, several seconds
async def test_keys_create_list_revoke_against_a_running_proxy(proxy: Proxy) -> None:
    admin = ("--url", proxy.url, "--admin-key", ADMIN_KEY)
    code, out, err = await run_cli(
        "keys", "create", "--org", "acme", "--name", "from-cli", "--rpm", "2", "--json", *admin
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["org_id"] == "acme" and created["name"] == "from-cli"
    assert created["limits"]["rpm"] == 2
    key, kid = created["key"], created["id"]
    assert await chat_status(None, proxy.url, key, HELLO) == 200

    code, out, _ = await run_cli("keys", "list", "--org", "acme", "--json", *admin)
    assert code == 0
    listed = json.loads(out)["data"]
    assert [k["id"] for k in listed] == [kid]
    assert key not in out  # the plaintext is shown once, at creation

    code, out, _ = await run_cli("keys", "update", kid, "--name", "renamed", "--json", *admin)
    assert code == 0 and json.loads(out)["name"] == "renamed"

    code, out, _ = await run_cli("keys", "revoke", kid, "--json", *admin)
    assert code == 0 and json.loads(out)["revoked"] is True
    assert await chat_status(None, proxy.url, key, HELLO) == 401

    code, out, _ = await run_cli("org-limits", "acme", "--set", "--rpm", "7", *admin)
    assert code == 0 and json.loads(out)["limits"]["rpm"] == 7
    code, out, _ = await run_cli("org-limits", "acme", *admin)
    assert json.loads(out)["limits"]["rpm"] == 7


async def test_keys_commands_fail_visibly(proxy: Proxy) -> None:
    # A wrong admin key: the proxy's 401 in one line, and the exit code says it failed.
    code, out, err = await run_cli("keys", "list", "--url", proxy.url, "--admin-key", "sk-bp-wrong")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "HTTP 401" in err and "Incorrect API key" in err
    # No admin key at all.
    code, _, err = await run_cli("keys", "list", "--url", proxy.url, env={"PROXY_ADMIN_KEY": ""})
    assert code == 2 and "admin key" in err
    # Nothing listening.
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run_cli("keys", "list", "--url", dead, "--admin-key", ADMIN_KEY)
    assert code == 1 and "cannot reach" in err


def _accepts_connections(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
async def test_serve_with_embedded_redis_starts_serves_and_stops_cleanly(
    tmp_path: Path, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("PROXY__REDIS__DATA_DIR", str(data_dir))
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), "")
    log = tmp_path / "proxy.log"

    started = time.monotonic()
    running = await start_proxy_process(config, log)  # returns once /readyz answers 200
    ready_after = time.monotonic() - started
    try:
        while (status := await chat_status(None, running.url, ADMIN_KEY, HELLO)) != 200:
            assert time.monotonic() - started < 30, f"no successful request: {status}"
            await asyncio.sleep(0.02)
        first_request_after = time.monotonic() - started
        print(
            f"\nembedded default: /readyz 200 after {ready_after:.2f} s, "
            f"first successful chat completion after {first_request_after:.2f} s"
        )
        found = re.search(r"embedded redis-server on redis://127\.0\.0\.1:(\d+)/0", log.read_text())
        assert found, log.read_text()
        redis_port = int(found.group(1))
        assert _accepts_connections(redis_port)
        assert (data_dir / "redis.log").exists()  # its data lives where it was told
        pids = [int(p) for p in _children(running.process.pid)]
        redis_pids = [p for p in pids if "redis-server" in _cmdline(p)]
        assert len(redis_pids) == 1, pids

        running.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(running.process.wait, 20)
        assert code == 0, log.read_text()
        assert not _alive(redis_pids[0]), "the embedded redis-server outlived the proxy"
        assert not _accepts_connections(redis_port)
    finally:
        running.stop()


def _children(pid: int) -> list[str]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return path.read_text().split() if path.exists() else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.mark.slow
async def test_demo_prints_a_working_key_and_snippets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``llm-proxy demo`` on a fresh machine: embedded Redis, bundled mock, a key that works."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--port",
        str(port),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(REPO), "PROXY__REDIS__DATA_DIR": str(tmp_path)},
        cwd=str(tmp_path),
    )
    assert process.stdout is not None
    printed = ""
    try:
        while "Press Ctrl-C" not in printed:
            line = await asyncio.wait_for(process.stdout.readline(), 30)
            assert line, f"demo exited early: {printed}"
            printed += line.decode()
        key = re.search(r'api_key="(sk-bp-[^"]+)"', printed)
        assert key, printed
        assert f"curl http://127.0.0.1:{port}/v1/chat/completions" in printed
        assert f"Authorization: Bearer {key.group(1)}" in printed
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key.group(1), max_retries=0
        ) as client:
            answer = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
            )
        assert answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.total_tokens > 0
        assert f"ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_AUTH_TOKEN=" in printed
        async with anthropic.AsyncAnthropic(
            base_url=f"http://127.0.0.1:{port}", api_key=key.group(1), max_retries=0
        ) as claude:
            message = await claude.messages.create(
                model="claude-sonnet-4-5",
                max_tokens=20,
                messages=[{"role": "user", "content": "Hello"}],
            )
        assert message.usage.output_tokens > 0
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0, printed


# --- usage and budgets ------------------------------------------------------------------------


async def spend_some(proxy: Proxy) -> tuple[dict[str, str], int]:
    """A few priced requests from two keys and end users; returns keys by id and their cost."""
    from proxy.catalog.pricing import cost_nano
    from proxy.gateway.state import GATEWAY

    keys = dict([await proxy.create_key("acme"), await proxy.create_key("acme")])
    total = 0
    for n, key in enumerate([*keys.values(), *keys.values()]):
        client = proxy.openai(key)
        model = "gpt-4o" if n % 2 else "gpt-4o-mini"
        done = await client.chat.completions.create(
            model=model,
            messages=MESSAGES,
            extra_headers={"X-On-Behalf-Of": f"user-{n % 3}"},
        )
        assert done.usage is not None
        route = proxy.app[GATEWAY].routes.get(model)
        assert route is not None
        total += cost_nano(route.price, done.usage.prompt_tokens, done.usage.completion_tokens)
    return keys, total


@pytest.mark.slow  # runs the CLI in processes of its own, several seconds
async def test_usage_prints_a_table_with_totals_and_json_and_csv_for_scripts(
    proxy: Proxy,
) -> None:
    import csv
    import io
    from decimal import Decimal

    keys, total = await spend_some(proxy)
    admin = ("--url", proxy.url, "--admin-key", ADMIN_KEY)
    code, out, err = await run_cli(
        "usage", "--group-by", "model,api_key_id", "--since", "7d", *admin
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("usage ") and "by model, api_key_id" in lines[0]
    assert lines[1].split()[:3] == ["model", "api_key_id", "requests"]
    assert lines[-1].split()[0] == "TOTAL"
    assert Decimal(lines[-1].split()[-1]) == Decimal(total) / 10**9
    assert {kid for kid in keys if kid in out} == set(keys)

    code, out, err = await run_cli("usage", "--group-by", "external_user_id", "--json", *admin)
    assert code == 0, err
    report = json.loads(out)
    assert report["total"]["cost_nano"] == str(total) and report["total"]["num_model_requests"] == 4
    assert sorted(r["external_user_id"] for r in report["data"]) == ["user-0", "user-1", "user-2"]

    code, out, err = await run_cli(
        "usage", "--group-by", "model", "--bucket", "1h", "--since", "3h", "--org", "acme", "--csv",
        *admin,
    )  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert set(rows[0]) >= {"bucket", "model", "num_model_requests", "cost_nano", "cost"}
    assert sum(int(r["cost_nano"]) for r in rows) == total
    assert sum(int(r["num_model_requests"]) for r in rows) == 4

    for argv, message in (
        (["--group-by", "colour"], "--group-by"),
        (["--since", "yesterday"], "--since"),
        (["--from", "2026-13-45"], "--from"),
        (["--bucket", "1m", "--since", "2w"], "at most 1000"),
    ):
        code, _, err = await run_cli("usage", *argv, *admin)
        assert code == 2 and message in err, (argv, err)
    _, member = await proxy.create_key("acme")
    code, _, err = await run_cli("usage", "--url", proxy.url, "--admin-key", member)
    assert code == 1 and "HTTP 403" in err


@pytest.mark.slow  # runs the CLI in processes of its own, several seconds
async def test_budgets_commands_print_tables(proxy: Proxy) -> None:
    keys, _ = await spend_some(proxy)
    kid = next(iter(keys))
    admin = ("--url", proxy.url, "--admin-key", ADMIN_KEY)
    code, out, err = await run_cli(
        "budgets", "set", "apikey", kid, "--period", "monthly", "--limit", "0.01",
        "--alert", "1", "--block", "10000", *admin,
    )  # fmt: skip
    assert code == 0, err
    header, rule, row = out.splitlines()
    assert header.split()[:3] == ["id", "scope", "scope"] and set(rule) <= {"-", " "}
    assert row.split()[1:3] == ["apikey", kid] and "alert@1%" in row
    # A request crosses the alert line: an event.
    await proxy.openai(keys[kid]).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    code, out, err = await run_cli("budgets", "events", "apikey", kid, *admin)
    assert code == 0, err
    assert "threshold_alert" in out and out.splitlines()[0].split()[:2] == ["created", "at"]
    code, out, _ = await run_cli("budgets", "get", "apikey", kid, "--json", *admin)
    assert json.loads(out)["data"][0]["scope_id"] == kid
    code, out, _ = await run_cli("budgets", "list", *admin)
    assert code == 0 and kid in out
    code, out, _ = await run_cli("budgets", "get", "org", "acme", *admin)
    assert code == 0 and out.strip() == "(no budgets)"
    code, out, err = await run_cli("budgets", "delete", "apikey", kid, *admin)
    assert code == 0 and out.strip() == f"deleted the org budget of apikey {kid}", err
    code, _, err = await run_cli("budgets", "delete", "apikey", kid, *admin)
    assert code == 1 and "HTTP 404" in err
    code, _, err = await run_cli(
        "budgets", "set", "org", "acme", "--period", "daily", "--limit", "5", *admin
    )
    assert code == 2 and "--alert" in err


@pytest.mark.slow  # runs the CLI in processes of its own
async def test_keys_print_tables_and_cover_expiry_metadata_and_rotation(proxy: Proxy) -> None:
    """Issue 23 items 5 and 6: ``llm-proxy keys`` prints tables (``--json`` for scripts), and
    sets expiry and metadata and rotates with a grace period."""
    admin = ("--url", proxy.url, "--admin-key", ADMIN_KEY)
    code, out, err = await run_cli(
        "keys", "create", "--org", "acme", "--name", "ci", "--expires-in", "30d",
        "--metadata", "team=search", "--rpm", "5", *admin,
    )  # fmt: skip
    assert code == 0, err
    assert re.search(r"key id\s+org\s+name", out) and "team=search" in out and "rpm=5" in out
    kid = re.search(r"(key_[0-9a-f]+)", out)
    secret = re.search(r"^key: (sk-bp-\S+)$", out, re.M)
    assert kid and secret, out
    code, out, _ = await run_cli("keys", "get", kid.group(1), "--json", *admin)
    record = json.loads(out)
    assert record["metadata"] == {"team": "search"}
    assert abs(record["expires_at"] - (time.time() + 30 * 86400)) < 120
    code, out, err = await run_cli("keys", "rotate", kid.group(1), "--grace-seconds", "600", *admin)
    assert code == 0, err
    new = re.search(r"^key: (sk-bp-\S+)$", out, re.M)
    assert new and new.group(1) != secret.group(1) and "previous secret works until" in out
    for key in (secret.group(1), new.group(1)):  # both, during the grace period
        assert await chat_status(None, proxy.url, key, HELLO) == 200
    code, out, err = await run_cli("keys", "rotate", "key_0000000000000000", *admin)
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and "HTTP 404" in err
    code, out, _ = await run_cli("keys", "list", "--org", "acme", *admin)
    assert code == 0 and kid.group(1) in out and "2 " not in out.splitlines()[0]


@pytest.mark.slow  # runs the CLI in processes of its own
async def test_budgets_cover_end_users_and_quote_says_what_binds(proxy: Proxy) -> None:
    """Issue 23 item 5: ``budgets set`` for an end user and the default for each end user
    (an id with a "/" in it too), and ``llm-proxy quote``."""
    admin = ("--url", proxy.url, "--admin-key", ADMIN_KEY)
    limits = ("--period", "daily", "--kind", "tokens", "--limit", "50", "--block", "100")
    kid, _ = await proxy.create_key("acme")
    code, out, err = await run_cli(
        "budgets", "set", "end-user", "team/alice", "--org", "acme", *limits, *admin
    )
    assert code == 0, err
    assert "external_user" in out and "team/alice" in out
    code, out, err = await run_cli(
        "budgets", "set", "end-user-default", "--org", "acme", *limits, *admin
    )
    assert code == 0, err
    assert "external_user_default" in out
    code, out, _ = await run_cli("budgets", "get", "end-user", "team/alice", "--org", "acme",
                                 "--json", *admin)  # fmt: skip
    assert json.loads(out)["data"][0]["scope_id"] == "team/alice"
    code, out, err = await run_cli(
        "quote", kid, "--model", "gpt-4o-mini", "--prompt", "hello", "--max-tokens", "10",
        "--end-user", "team/alice", *admin,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("decision: admit (HTTP 200)") and "worst case:" in out
    assert "binding: external_user team/alice daily tokens budget" in out
    code, out, err = await run_cli(
        "quote", kid, "--model", "gpt-4o-mini", "--prompt", "hello", "--max-tokens", "100",
        "--end-user", "team/alice", *admin,
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("decision: refuse (HTTP 429)") and "refusal:" in out
    code, _, err = await run_cli("quote", kid, *admin)
    assert code == 2 and "--model" in err
