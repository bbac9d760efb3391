"""OpenTelemetry (issue 23, item 8): a span per request with the GenAI attributes, the budget
decision and the cost, the client's W3C trace continued upstream, and the GenAI client metrics,
all reaching an OTLP/HTTP receiver the test runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from conftest import Proxy
from helpers import mock_output, user_messages
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from proxy.gateway.telemetry import TELEMETRY

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class Receiver:
    """An OTLP/HTTP collector: takes protobuf posts to /v1/traces and /v1/metrics."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    receiver.traces.append(ExportTraceServiceRequest.FromString(body))
                elif self.path == "/v1/metrics":
                    receiver.metrics.append(ExportMetricsServiceRequest.FromString(body))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        return [
            span
            for request in self.traces
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    def metric_names(self) -> set[str]:
        return {
            metric.name
            for request in self.metrics
            for resource in request.resource_metrics
            for scope in resource.scope_metrics
            for metric in scope.metrics
        }


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """Requested first, so it outlives the proxy, whose shutdown flushes to it."""
    started = Receiver()
    yield started
    started.server.shutdown()


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


async def _flush(proxy: Proxy) -> None:
    telemetry = proxy.app[TELEMETRY]
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, telemetry.tracer_provider.force_flush)
    await loop.run_in_executor(None, telemetry.meter_provider.force_flush)


async def test_a_span_with_the_genai_attributes_reaches_the_collector(
    receiver: Receiver, start_proxy: Callable[..., Any], mock_upstream: TestServer
) -> None:
    proxy: Proxy = await start_proxy(
        telemetry={"otlp_endpoint": receiver.url, "metrics_interval_seconds": 3600}
    )
    _, key = await proxy.create_key("acme")
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    body = {"model": "gpt-4o-mini", "messages": user_messages("hello"), "max_tokens": 20}
    headers = {"Authorization": f"Bearer {key}", "traceparent": traceparent, **mock_output(6)}
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status == 200
        answer = await response.json()
        cost_nano = int(response.headers["x-llm-cost-nano"])
    await _flush(proxy)
    [span] = receiver.spans()
    attributes = {a.key: _value(a.value) for a in span.attributes}
    assert span.name == "chat gpt-4o-mini"
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CLIENT_SPAN
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.usage.input_tokens"] == answer["usage"]["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == answer["usage"]["completion_tokens"] == 6
    assert attributes["llm_proxy.budget.decision"] == "admitted"
    assert attributes["llm_proxy.cost_nano"] == cost_nano > 0
    # The upstream got the client's trace, with the proxy's span as its parent.
    sent = proxy.received()[-1].headers
    assert sent["traceparent"] == f"00-{TRACE_ID}-{span.span_id.hex()}-01"
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"} <= (
        receiver.metric_names()
    )


async def test_a_refusal_is_a_span_with_its_decision(
    receiver: Receiver, start_proxy: Callable[..., Any], mock_upstream: TestServer
) -> None:
    proxy: Proxy = await start_proxy(telemetry={"otlp_endpoint": receiver.url})
    _, key = await proxy.create_key("acme", limits={"rpm": 1})
    body = {"model": "gpt-4o-mini", "messages": user_messages("hello")}
    statuses = []
    for _ in range(2):
        async with proxy.session.post(
            proxy.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            statuses.append(response.status)
    assert statuses == [200, 429]
    await _flush(proxy)
    refused = [s for s in receiver.spans() if s.status.code == 2]
    assert len(refused) == 1
    attributes = {a.key: _value(a.value) for a in refused[0].attributes}
    assert attributes["llm_proxy.budget.decision"] == "rate_limit_rpm"
    assert attributes["error.type"] == "rate_limit_rpm"


async def test_off_by_default_the_client_trace_still_goes_upstream(proxy: Proxy) -> None:
    assert TELEMETRY not in proxy.app
    _, key = await proxy.create_key("acme")
    traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
    body = {"model": "gpt-4o-mini", "messages": user_messages("hello")}
    headers = {"Authorization": f"Bearer {key}", "traceparent": traceparent}
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions", json=body, headers=headers
    ) as response:
        assert response.status == 200
    assert proxy.received()[-1].headers["traceparent"] == traceparent
