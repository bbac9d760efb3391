"""Operating the proxy: Prometheus metrics that count real traffic, one JSON access-log line per
request, graceful shutdown with a stream in flight, several workers sharing one port (and one
set of limits and metrics), and the health endpoints.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import helpers
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from conftest import (
    ADMIN_KEY,
    Proxy,
    ProxyProcess,
    ProxyTestServer,
    eventually,
    make_settings,
    start_proxy_process,
    usage_record,
    write_config,
)
from helpers import auth, post_chat, user_messages
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import create_app
from proxy.catalog.pricing import Price, cost_nano
from proxy.serving import freeze_startup_objects
from proxy.tools.mock import WORDS

UPSTREAM_SECRET = "sk-upstream-secret"
# gpt-4o has this price in the test config (see conftest.make_settings).
GPT_4O = Price(2_500_000_000, 1_250_000_000, 10_000_000_000, "config")
PROMPT = "zebra quokka marmalade telescope"
MESSAGES = user_messages(PROMPT)
# The mock's prompt count: words + 4 per message + 3.
MOCK_PROMPT = 4 + 4 + 3
END_USER = "end-user-7f3a9c"
GENERATED_ID = re.compile(r"^req_[0-9a-f]{18}$")
ERROR_FIELDS = {"message", "type", "code", "param"}
ACCESS = "llm_proxy.access"


# --- helpers ---------------------------------------------------------------------------------


def chat_body(output_tokens: int = 5, stream: bool = False, **extra: Any) -> dict[str, Any]:
    return helpers.chat_body("gpt-4o", MESSAGES, output_tokens, stream, **extra)


def streamed_text(raw: bytes) -> tuple[str, bool]:
    """(content of an SSE chat stream, whether it ended with [DONE])."""
    text, done = "", False
    for line in raw.decode().splitlines():
        if not line.startswith("data: "):
            continue
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
            continue
        for choice in json.loads(payload).get("choices") or ():
            text += choice.get("delta", {}).get("content") or ""
    return text, done


def assert_openai_error(raw: bytes, type_: str) -> None:
    body = json.loads(raw)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["type"] == type_ and body["error"]["message"], body


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def labels(**values: str) -> frozenset[tuple[str, str]]:
    return frozenset(values.items())


def deltas(before: Samples, after: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every label set of one sample name whose value changed, with the change."""
    changed = {}
    for (sample, label_set), value in after.items():
        if sample == name and value != before.get((sample, label_set), 0.0):
            changed[label_set] = value - before.get((sample, label_set), 0.0)
    return changed


async def scrape(
    session: aiohttp.ClientSession, base_url: str, token: str | None = None
) -> tuple[str, str]:
    """(/metrics text, the x-request-id of the answer: it names the process that answered)."""
    async with session.get(
        base_url + "/metrics", headers=auth(token) if token else None
    ) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return await response.text(), response.headers["x-request-id"]


def worker_of(request_id: str) -> str:
    """Generated ids are ``req_<10 hex per process><8 hex counter>``."""
    assert GENERATED_ID.match(request_id), request_id
    return request_id[4:14]


async def create_key_at(
    session: aiohttp.ClientSession, base_url: str, org: str, **spec: Any
) -> tuple[str, str]:
    async with session.post(
        base_url + "/api/v1/keys", json={"org_id": org, **spec}, headers=auth(ADMIN_KEY)
    ) as response:
        body = await response.json()
        assert response.status == 201, body
        return body["id"], body["key"]


async def org_books(store: aioredis.Redis, org: str) -> dict[str, Any]:
    """Usage records, spend windows (cost, tokens), leases and in-flight totals of one org."""
    p = f"bp:{{o:{org}}}:"
    records = [usage_record(fields) for _, fields in await store.xrange(p + "usage")]
    spend = {}
    async for name in store.scan_iter(p + "spend:o:*"):
        data = await store.hgetall(name)
        spend[name] = (int(data["c"]), int(data["t"]))
    inflight = await store.hgetall(p + "infl:o")
    return {
        "records": records,
        "spend": spend,
        "leases": await store.zcard(p + "leases"),
        "inflight": {k: int(v) for k, v in inflight.items() if int(v)},
    }


# --- 1. metrics ------------------------------------------------------------------------------


async def test_metrics_count_real_traffic_and_leak_nothing(
    start_proxy: Callable[..., Awaitable[Proxy]],
    store: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PROXY_METRICS_TOKEN", raising=False)
    proxy = await start_proxy()
    org = "ops-metrics"
    limited_id, limited = await proxy.create_key(org, name="limited", limits={"rpm": 3})
    broke_id, broke = await proxy.create_key(org, name="broke")
    status, answer = await proxy.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{broke_id}",
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": 1,
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200, answer
    bogus = "sk-bogus-key-that-was-never-issued-4711"
    before = parse_metrics((await scrape(proxy.session, proxy.url))[0])

    who = {"X-On-Behalf-Of": END_USER}
    outputs = [5, 6, 7]
    statuses = []
    for index, out in enumerate([*outputs, 8, 9]):  # rpm 3: the last two are refused
        status, raw, _ = await post_chat(
            proxy.session,
            proxy.url,
            limited,
            chat_body(out, stream=index == 1),
            {**who, "x-mock-output-tokens": str(out)},
        )
        statuses.append(status)
        if index == 1:
            assert streamed_text(raw) == ("".join(WORDS[:out]), True)
    assert statuses == [200, 200, 200, 429, 429]
    status, raw, _ = await post_chat(proxy.session, proxy.url, broke, chat_body(), who)
    assert status == 429 and json.loads(raw)["error"]["code"] == "budget_exceeded", raw
    status, raw, _ = await post_chat(proxy.session, proxy.url, bogus, chat_body(), who)
    assert status == 401, raw

    async def settled() -> tuple[Samples, str] | None:
        text, _ = await scrape(proxy.session, proxy.url)
        after = parse_metrics(text)
        done = deltas(before, after, "llm_proxy_admission_decisions_total")
        # A stream ends for the client just before it is settled and counted.
        return (after, text) if done.get(labels(decision="admitted")) == 3 else None

    after, text = await eventually(settled, what="three admitted requests in /metrics")

    assert deltas(before, after, "llm_proxy_admission_decisions_total") == {
        labels(decision="admitted"): 3,
        labels(decision="rate_limit_rpm"): 2,
        labels(decision="budget"): 1,
        labels(decision="auth"): 1,
    }
    assert deltas(before, after, "llm_proxy_requests_total") == {
        labels(endpoint="chat/completions", model="gpt-4o", status="200"): 3,
        labels(endpoint="chat/completions", model="gpt-4o", status="429"): 3,
        labels(endpoint="chat/completions", model="", status="401"): 1,
    }

    # Tokens and cost equal what was settled in Redis, which equals what the upstream reported.
    books = await org_books(store, org)
    records = books["records"]
    assert len(records) == 3
    assert sum(r["in"] for r in records) == 3 * MOCK_PROMPT
    assert sum(r["out"] for r in records) == sum(outputs)
    expected_cost = sum(cost_nano(GPT_4O, MOCK_PROMPT, out) for out in outputs)
    assert sum(r["cost_nano"] for r in records) == expected_cost
    assert set(books["spend"].values()) == {(expected_cost, 3 * MOCK_PROMPT + sum(outputs))}
    assert deltas(before, after, "llm_proxy_tokens_total") == {
        labels(model="gpt-4o", org=org, direction="input"): 3 * MOCK_PROMPT,
        labels(model="gpt-4o", org=org, direction="output"): sum(outputs),
    }
    assert deltas(before, after, "llm_proxy_cost_nano_total") == {
        labels(model="gpt-4o", org=org): expected_cost
    }

    # Upstream time is observed once per admitted request; proxy overhead once per answered
    # LLM request (a refusal's whole latency is overhead).
    assert deltas(before, after, "llm_proxy_upstream_seconds_count") == {labels(model="gpt-4o"): 3}
    assert deltas(before, after, "llm_proxy_overhead_seconds_count") == {
        labels(endpoint="chat/completions"): 7
    }
    # One admit script call per authenticated request, one settle per admitted one.
    assert deltas(before, after, "llm_proxy_redis_seconds_count") == {
        labels(script="admit"): 6,
        labels(script="settle"): 3,
    }
    assert after[("llm_proxy_redis_seconds_sum", labels(script="admit"))] > 0

    for secret in (
        limited,
        broke,
        bogus,
        limited_id,
        broke_id,
        UPSTREAM_SECRET,
        ADMIN_KEY,
        PROMPT,
        "quokka",
        END_USER,
    ):
        assert secret not in text, f"{secret!r} appears in /metrics"


async def test_metrics_token_guards_the_endpoint(
    start_proxy: Callable[..., Awaitable[Proxy]], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "metrics-token-5d41402abc4b2a76"
    monkeypatch.setenv("PROXY_METRICS_TOKEN", token)
    proxy = await start_proxy()
    for headers in ({}, auth("wrong-token"), auth(ADMIN_KEY), {"Authorization": token + "x"}):
        async with proxy.session.get(proxy.url + "/metrics", headers=headers) as response:
            raw = await response.read()
            assert response.status == 401, (headers, raw)
            assert_openai_error(raw, "authentication_error")
            assert b"llm_proxy" not in raw
    text, _ = await scrape(proxy.session, proxy.url, token)
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {"llm_proxy_requests", "llm_proxy_admission_decisions"} <= families


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address: str = probe.getsockname()[0]
    return None if ipaddress.ip_address(address).is_loopback else address


async def test_metrics_without_a_token_are_for_loopback_callers_only(
    redis_url: str, mock_upstream: TestServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11 item 5: a fresh proxy on a public interface answered anonymous callers with
    every org id and its spend. Without a token, only loopback peers are answered now."""
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    monkeypatch.delenv("PROXY_METRICS_TOKEN", raising=False)
    monkeypatch.setenv("TEST_PROXY_ADMIN_KEY", ADMIN_KEY)
    app = create_app(make_settings(str(mock_upstream.make_url("/v1"))), redis_url)
    server = ProxyTestServer(app, host="0.0.0.0")  # noqa: S104 - the point of the test
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            _, key = await create_key_at(session, f"http://127.0.0.1:{server.port}", "acme-corp")
            await post_chat(session, f"http://127.0.0.1:{server.port}", key, chat_body())
            async with session.get(f"http://{address}:{server.port}/metrics") as response:
                raw = await response.read()
                assert response.status == 403, raw
                assert_openai_error(raw, "permission_error")
                assert b"acme-corp" not in raw and b"llm_proxy" not in raw
            text, _ = await scrape(session, f"http://127.0.0.1:{server.port}", None)
            assert "acme-corp" in text  # a local scraper still sees everything
    finally:
        await server.close()


# --- 2. access log ---------------------------------------------------------------------------


async def test_a_streams_wait_for_the_upstream_is_upstream_time_not_overhead(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 11 item 9: the stream relay restarted its timer once the upstream's headers
    came, so the upstream's 300 ms before its first byte was logged as the proxy's."""
    caplog.set_level(logging.INFO, logger=ACCESS)
    _, key = await proxy.create_key("ops-timing")
    latency = {"x-mock-latency-ms": "300", "x-request-id": "slow-stream"}
    status, raw, _ = await post_chat(proxy.session, proxy.url, key, chat_body(3, True), latency)
    assert status == 200, raw

    async def line() -> dict[str, Any] | None:
        found = [x for x in access_lines(caplog) if x["request_id"] == "slow-stream"]
        return found[0] if found else None

    logged = await eventually(line, what="the stream's access-log line")
    assert logged["upstream_ms"] >= 300, logged
    assert logged["overhead_ms"] < 300, logged


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == ACCESS]


async def test_one_json_log_line_per_request_with_correct_values_and_no_secrets(
    proxy: Proxy, store: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.INFO, logger=ACCESS)
    org = "ops-logs"
    key_id, key = await proxy.create_key(org, name="app")
    bogus = "sk-bogus-key-that-was-never-issued-0815"
    caplog.clear()
    s, url = proxy.session, proxy.url
    who = {"X-On-Behalf-Of": END_USER}

    # Admitted, buffered, with the client's own request id.
    status, raw, headers = await post_chat(
        s, url, key, chat_body(7), {**who, "x-request-id": "client-trace-42"}
    )
    assert status == 200, raw
    assert headers["x-request-id"] == "client-trace-42"
    # Admitted, streamed, without a request id: one is generated and returned.
    status, raw, headers = await post_chat(
        s, url, key, chat_body(4, stream=True), {"x-mock-output-tokens": "4"}
    )
    assert status == 200 and streamed_text(raw)[1], raw
    streamed_id = headers["x-request-id"]
    assert GENERATED_ID.match(streamed_id), streamed_id
    # A request id of 128 printable characters is kept; one of 129 is replaced.
    longest = "r" * 128
    status, _, headers = await post_chat(s, url, key, chat_body(1), {"x-request-id": longest})
    assert status == 200 and headers["x-request-id"] == longest
    status, _, headers = await post_chat(s, url, key, chat_body(1), {"x-request-id": "r" * 129})
    assert status == 200
    replaced_id = headers["x-request-id"]
    assert GENERATED_ID.match(replaced_id), replaced_id
    # Errors: an unknown key (401) and an invalid body (400), both carrying the prompt.
    status, raw, headers = await post_chat(
        s, url, bogus, chat_body(), {**who, "x-request-id": "client-401"}
    )
    assert status == 401 and headers["x-request-id"] == "client-401", raw
    status, raw, headers = await post_chat(
        s,
        url,
        key,
        {**chat_body(), "stream": "yes"},
        {**who, "x-request-id": "client-400"},
    )
    assert status == 400 and headers["x-request-id"] == "client-400", raw
    # The upstream credential really was used, so its absence from the log means something.
    assert proxy.received()[-1].headers["authorization"] == f"Bearer {UPSTREAM_SECRET}"

    async def six_lines() -> list[dict[str, Any]] | None:
        lines = access_lines(caplog)
        return lines if len(lines) >= 6 else None

    lines = await eventually(six_lines, what="six access-log lines")
    assert len(lines) == 6, lines
    by_id = {line["request_id"]: line for line in lines}
    assert set(by_id) == {
        "client-trace-42",
        streamed_id,
        longest,
        replaced_id,
        "client-401",
        "client-400",
    }

    records = {r["rid"]: r for r in (await org_books(store, org))["records"]}
    assert len(records) == 4

    first = by_id["client-trace-42"]
    assert GENERATED_ID.match(first["accounting_id"]) and first["accounting_id"] in records
    timings = {name: first.pop(name) for name in ("ts", "overhead_ms", "upstream_ms")}
    assert timings["overhead_ms"] >= 0 and timings["upstream_ms"] > 0
    assert abs(timings["ts"] - time.time()) < 60
    assert first == {
        "request_id": "client-trace-42",
        "accounting_id": first["accounting_id"],
        "method": "POST",
        "path": "/v1/chat/completions",
        "key_id": key_id,
        "org_id": org,
        "on_behalf_of": END_USER,
        "model": "gpt-4o",
        "upstream": "mock",
        "status": 200,
        "decision": "admitted",
        "input_tokens": MOCK_PROMPT,
        "output_tokens": 7,
        "cost_nano": cost_nano(GPT_4O, MOCK_PROMPT, 7),
    }
    record = records[first["accounting_id"]]
    assert (record["in"], record["out"], record["cost_nano"], record["user"]) == (
        MOCK_PROMPT,
        7,
        first["cost_nano"],
        END_USER,
    )

    streamed = by_id[streamed_id]
    assert streamed["accounting_id"] in records and streamed["accounting_id"] != streamed_id
    assert (streamed["status"], streamed["decision"], streamed["output_tokens"]) == (
        200,
        "admitted",
        4,
    )
    assert "on_behalf_of" not in streamed
    assert streamed["upstream_ms"] > 0

    unauthorized = by_id["client-401"]
    assert (unauthorized["status"], unauthorized["decision"]) == (401, "auth")
    assert (unauthorized["method"], unauthorized["path"]) == ("POST", "/v1/chat/completions")
    for absent in ("key_id", "org_id", "model", "accounting_id", "cost_nano"):
        assert absent not in unauthorized, unauthorized

    invalid = by_id["client-400"]
    assert (invalid["status"], invalid["decision"], invalid["key_id"], invalid["org_id"]) == (
        400,
        "invalid",
        key_id,
        org,
    )
    assert "accounting_id" not in invalid and "cost_nano" not in invalid

    everything = "\n".join([r.getMessage() for r in caplog.records] + [caplog.text])
    for secret in (key, bogus, UPSTREAM_SECRET, ADMIN_KEY, PROMPT, "quokka"):
        assert secret not in everything, f"{secret!r} was logged"


# --- 3. graceful shutdown --------------------------------------------------------------------


@pytest.mark.slow
async def test_sigterm_lets_a_stream_finish_refuses_new_connections_and_settles(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer, store: aioredis.Redis
) -> None:
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url)
    log = tmp_path / "proxy.log"
    running = await start_proxy_process(config, log)
    host, port = urlsplit(running.url).hostname, urlsplit(running.url).port
    org = "ops-shutdown"
    words = 20
    try:
        async with aiohttp.ClientSession() as session:
            _, key = await create_key_at(session, running.url, org)
            body = {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": "count slowly please"}],
                "stream": True,
            }
            headers = {
                **auth(key),
                "x-mock-chunk-delay-ms": "100",
                "x-mock-output-tokens": str(words),
            }
            async with session.post(
                running.url + "/v1/chat/completions", json=body, headers=headers
            ) as response:
                assert response.status == 200
                received = bytearray()
                while streamed_text(bytes(received))[0].count(" ") < 2:
                    line = await asyncio.wait_for(response.content.readline(), 10)
                    assert line, "the stream ended before its first chunks"
                    received += line

                running.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                rest = asyncio.ensure_future(response.content.read())

                async def refused() -> bool:
                    try:
                        _, writer = await asyncio.open_connection(host, port)
                    except ConnectionRefusedError:
                        return True
                    writer.close()
                    await writer.wait_closed()
                    return False

                try:
                    await eventually(refused, within=5, what="the listener to close")
                    assert not rest.done(), "the stream ended before the listener closed"
                    assert running.process.poll() is None, "exited with a stream in flight"
                    received += await asyncio.wait_for(rest, 15)
                finally:
                    rest.cancel()
            text, done = streamed_text(bytes(received))
            assert done, "no [DONE]: the stream was cut"
            assert text == "".join(WORDS[:words])

        code = await asyncio.to_thread(running.process.wait, 10)
        assert code == 0, log.read_text()
        assert time.monotonic() - signalled < 10  # shutdown_grace_seconds in write_config
    finally:
        running.stop()

    prompt = 3 + 4 + 3
    books = await org_books(store, org)
    [record] = books["records"]
    assert (record["in"], record["out"], record["status"], record["client_gone"]) == (
        prompt,
        words,
        200,
        False,
    )
    assert record["cost_nano"] > 0
    assert len(books["spend"]) == 3  # daily, weekly, monthly
    assert set(books["spend"].values()) == {(record["cost_nano"], prompt + words)}
    assert books["leases"] == 0 and books["inflight"] == {}
    # The stream's access-log line was written before the process went away.
    logged = [json.loads(x) for x in log.read_text().splitlines() if x.startswith('{"ts"')]
    assert [(line["decision"], line["output_tokens"]) for line in logged if "model" in line] == [
        ("admitted", words)
    ]


# --- 4. several workers on one port ----------------------------------------------------------


@pytest.fixture
async def two_workers(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> AsyncIterator[ProxyProcess]:
    """A ``serve --workers 2`` process, returned once both workers answer on the port."""
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url)
    log = tmp_path / "proxy.log"
    running = await start_proxy_process(config, log, workers=2, errors=tmp_path / "proxy.err")
    try:
        seen: set[str] = set()
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def both_answer() -> bool:
                async with session.get(running.url + "/healthz") as response:
                    assert response.status == 200
                    seen.add(worker_of(response.headers["x-request-id"]))
                return len(seen) == 2

            await eventually(both_answer, within=20, what="both workers to listen")
        yield running
    finally:
        await asyncio.to_thread(running.stop)


@pytest.mark.slow
async def test_two_workers_share_one_port_one_set_of_limits_and_metrics(
    two_workers: ProxyProcess, mock_upstream: TestServer
) -> None:
    url = two_workers.url
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        _, key = await create_key_at(session, url, "ops-workers", limits={"rpm": 10})
        body = {"model": "gpt-4o-mini", "messages": MESSAGES}
        answers = await asyncio.gather(*(post_chat(session, url, key, body) for _ in range(60)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200] * 10 + [429] * 50
        # Both processes answered (each generates ids with its own prefix), yet together they
        # admitted exactly the limit: the limit lives in Redis.
        workers = {worker_of(headers["x-request-id"]) for _, _, headers in answers}
        assert len(workers) == 2, workers

        # Any worker's /metrics covers both.
        scraped_by: set[str] = set()

        async def both_scraped() -> bool:
            text, request_id = await scrape(session, url)
            samples = parse_metrics(text)
            decisions = {
                dict(label_set)["decision"]: value
                for (name, label_set), value in samples.items()
                if name == "llm_proxy_admission_decisions_total"
            }
            assert decisions == {"admitted": 10, "rate_limit_rpm": 50}, decisions
            upstream = ("llm_proxy_upstream_seconds_count", labels(model="gpt-4o-mini"))
            assert samples[upstream] == 10
            scraped_by.add(worker_of(request_id))
            return scraped_by == workers

        await eventually(both_scraped, within=10, what="a scrape from each worker")

    # SIGTERM to the parent stops both workers cleanly.
    two_workers.process.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(two_workers.process.wait, 10)
    assert code == 0, two_workers.log.read_text()


@pytest.mark.slow
async def test_two_workers_write_the_access_log(two_workers: ProxyProcess) -> None:
    url, log = two_workers.url, two_workers.log
    connector = aiohttp.TCPConnector(force_close=True)
    sent: list[str] = []
    async with aiohttp.ClientSession(connector=connector) as session:
        for index in range(8):
            request_id = f"ops-log-{index}"
            async with session.get(url + "/healthz", headers={"x-request-id": request_id}) as r:
                assert r.status == 200
                sent.append(request_id)

    def logged() -> set[str]:
        lines = [x for x in log.read_text().splitlines() if x.startswith("{")]
        return {json.loads(x)["request_id"] for x in lines}

    async def all_logged() -> bool:
        return set(sent) <= logged()

    await eventually(all_logged, within=2, what="access-log lines in the process output")
    # Issue 11 item 9: on stdout, as documented; stderr holds diagnostics only.
    assert two_workers.errors is not None
    errors = two_workers.errors.read_text()
    assert "PROXY_SECRET_KEY is not set" in errors  # a diagnostic: it goes to stderr
    assert "request_id" not in errors and "ops-log-" not in errors


def test_a_worker_freezes_what_start_up_built_out_of_the_collectors_reach() -> None:
    """Full collections used to traverse every module and the price database: 20-50 ms pauses
    under load. After start-up they are frozen, so a collection scans only new objects."""

    def scanned(obj: object) -> bool:
        return any(o is obj for generation in range(3) for o in gc.get_objects(generation))

    assert scanned(create_app)
    try:
        freeze_startup_objects()
        assert not scanned(create_app)
        assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


# --- 5. health -------------------------------------------------------------------------------


async def test_healthz_and_readyz(proxy: Proxy, store: aioredis.Redis) -> None:
    async with proxy.session.get(proxy.url + "/healthz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ok"}
    async with proxy.session.get(proxy.url + "/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ready", "redis": "ok"}
    # A Redis that lost its scripts (restart, SCRIPT FLUSH) is made ready again by /readyz.
    await store.script_flush()
    async with proxy.session.get(proxy.url + "/readyz") as response:
        assert response.status == 200
        assert await response.json() == {"status": "ready", "redis": "ok"}
    _, key = await proxy.create_key("ops-health")
    status, raw, _ = await post_chat(proxy.session, proxy.url, key, chat_body(2))
    assert status == 200, raw
