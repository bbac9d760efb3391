"""OpenTelemetry for the LLM routes (``[telemetry] otlp_endpoint``; the ``otel`` extra): a span
per request following the GenAI semantic conventions, with the budget decision and the cost;
the GenAI client metrics (``gen_ai.client.token.usage``, ``gen_ai.client.operation.duration``);
W3C trace context taken from the client and passed upstream with this span as the parent.

Off (no endpoint), nothing here is imported and no middleware is installed: zero cost. On, it is
one middleware around the request path, reading the access record (``Outcome``) the request
leaves — ``pipeline.handle`` is not touched. Export runs in the SDK's own threads; shutdown
flushes off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.config import TelemetryConfig
from proxy.gateway.request_context import OUTCOME, Outcome
from proxy.openapi import declared

TELEMETRY: web.AppKey[Telemetry] = web.AppKey("telemetry")
_PROPAGATOR = TraceContextTextMapPropagator()

OPERATIONS = {
    "chat/completions": "chat",
    "messages": "chat",
    "responses": "chat",
    "converse": "chat",
    "converse-stream": "chat",
    "invoke": "chat",
    "invoke-with-response-stream": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}
"""``gen_ai.operation.name`` per endpoint; others are named by their endpoint."""
PROVIDERS = {
    "openai": "openai",
    "azure": "azure.ai.openai",
    "anthropic": "anthropic",
    "bedrock": "aws.bedrock",
}
_TOKEN_BUCKETS = [4.0**i for i in range(14)]  # 1, 4, 16, ... 67108864, as the conventions say
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92]  # fmt: skip


@dataclass
class Telemetry:
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    tracer: Any
    token_usage: Any
    duration: Any

    @classmethod
    def start(cls, config: TelemetryConfig) -> Telemetry:
        assert config.otlp_endpoint is not None
        base = config.otlp_endpoint.rstrip("/")
        resource = Resource.create({"service.name": config.service_name})
        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
        )
        reader = PeriodicExportingMetricReader(
            OTLPMetricExporter(endpoint=f"{base}/v1/metrics"),
            export_interval_millis=config.metrics_interval_seconds * 1000,
        )
        views = [
            View(
                instrument_name="gen_ai.client.token.usage",
                aggregation=ExplicitBucketHistogramAggregation(_TOKEN_BUCKETS),
            ),
            View(
                instrument_name="gen_ai.client.operation.duration",
                aggregation=ExplicitBucketHistogramAggregation(_DURATION_BUCKETS),
            ),
        ]
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader], views=views)
        meter = meter_provider.get_meter("llm-proxy")
        return cls(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            tracer=tracer_provider.get_tracer("llm-proxy"),
            token_usage=meter.create_histogram(
                "gen_ai.client.token.usage",
                unit="{token}",
                description="Number of input and output tokens used.",
            ),
            duration=meter.create_histogram(
                "gen_ai.client.operation.duration",
                unit="s",
                description="GenAI operation duration.",
            ),
        )

    async def shutdown(self) -> None:
        """Flushes what is pending; the exporters block, so not on the event loop."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.tracer_provider.shutdown)
        await loop.run_in_executor(None, self.meter_provider.shutdown)


def install(app: web.Application, config: TelemetryConfig) -> None:
    telemetry = app[TELEMETRY] = Telemetry.start(config)
    app.middlewares.insert(0, tracing_middleware)

    async def stop(_app: web.Application) -> None:
        await telemetry.shutdown()

    app.on_cleanup.append(stop)


@web.middleware
async def tracing_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: the request it passes on carries this span's ``traceparent`` (the client's
    trace continues upstream), and every inner middleware sees that same request."""
    spec = declared(request.match_info.handler)
    if spec is None or not spec.relayed:
        return await handler(request)
    telemetry = request.app[TELEMETRY]
    parent = _PROPAGATOR.extract(request.headers)
    span = telemetry.tracer.start_span("llm.request", context=parent, kind=SpanKind.CLIENT)
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=set_span_in_context(span))
    headers = request.headers.copy()
    headers.popall("tracestate", None)
    headers.update(carrier)
    inner = request.clone(headers=headers)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(inner)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        _finish(telemetry, span, inner.get(OUTCOME), status, time.perf_counter() - started)


def _finish(
    telemetry: Telemetry, span: Any, outcome: Outcome | None, status: int, seconds: float
) -> None:
    attributes: dict[str, Any] = {"http.response.status_code": status}
    metric: dict[str, Any] = {}
    if outcome is not None:
        operation = OPERATIONS.get(outcome.endpoint, outcome.endpoint)
        model = outcome.model or ""
        span.update_name(f"{operation} {model}".strip())
        attributes.update(
            {
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": model,
                "llm_proxy.budget.decision": outcome.decision,
                "llm_proxy.endpoint": outcome.endpoint,
            }
        )
        metric = {"gen_ai.operation.name": operation, "gen_ai.request.model": model}
        for name, value in (
            ("llm_proxy.key_id", outcome.key_id),
            ("llm_proxy.org_id", outcome.org_id),
            ("llm_proxy.request_id", outcome.request_id),
            ("llm_proxy.clamped_max_tokens", outcome.clamped_max_tokens),
        ):
            if value is not None:
                attributes[name] = value
        exchange = outcome.exchange
        if exchange is not None:
            provider = PROVIDERS.get(exchange.route.upstream.kind, exchange.route.upstream.kind)
            attributes["gen_ai.provider.name"] = metric["gen_ai.provider.name"] = provider
            attributes["llm_proxy.upstream"] = exchange.upstream
            attributes["llm_proxy.cost_nano"] = exchange.cost_nano
            attributes["llm_proxy.cost"] = exchange.cost_nano / 1e9
            usage = exchange.usage
            if usage is not None:
                attributes["gen_ai.usage.input_tokens"] = usage.input_tokens
                attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
                telemetry.token_usage.record(
                    usage.input_tokens, {**metric, "gen_ai.token.type": "input"}
                )
                telemetry.token_usage.record(
                    usage.output_tokens, {**metric, "gen_ai.token.type": "output"}
                )
    if status >= 400:
        error = (
            str(status) if outcome is None or outcome.decision == "admitted" else (outcome.decision)
        )
        attributes["error.type"] = metric["error.type"] = error
        span.set_status(Status(StatusCode.ERROR))
    span.set_attributes(attributes)
    span.end()
    telemetry.duration.record(seconds, metric)
