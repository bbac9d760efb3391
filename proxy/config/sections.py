"""The sections of the file besides upstreams and models: server, Redis, auth, timeouts, limits,
metering, budgets, usage counters, webhooks, metrics and telemetry."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from proxy.config.base import MAX_CONCURRENCY, MAX_RATE_LIMIT, Role, _Strict
from proxy.config.models import PriceConfig
from proxy.store import topology


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    workers: int = Field(1, ge=1)
    uvloop: bool = True
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    header_timeout_seconds: float = Field(10.0, gt=0)
    """A request's head must be complete this long after its first byte (or after connect)."""
    body_timeout_seconds: float = Field(30.0, gt=0)
    """Longest pause while a request body is being received."""
    body_deadline_seconds: float = Field(120.0, gt=0)
    """Longest a request body may take to arrive in full, however steadily it trickles in
    (``body_timeout_seconds`` only bounds each pause)."""
    max_bodies_per_key: int = Field(64, ge=1)
    """Request bodies one key may have still arriving at once, per process; past it 429, so
    one key's slow uploads cannot hold every connection. A body that came whole with its head
    is not counted, but on a busy process dozens of one heavy client's bodies can be mid-read
    at once (48 in flight did it here): the default leaves them room and still keeps one key's
    trickling uploads to a fraction of ``max_connections``."""
    keepalive_timeout_seconds: float = Field(75.0, gt=0)
    """Idle keep-alive connections are closed after this."""
    max_connections: int | None = Field(None, ge=1)
    """Open connections per process; None: half the process's file-descriptor limit."""
    tls_cert: str = ""
    """PEM certificate chain: with ``tls_key``, ``serve`` answers HTTPS only (TLS 1.2+)."""
    tls_key: str = ""

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("tls_cert and tls_key are set together")
        return self


class RedisConfig(_Strict):
    url: str = ""
    """Empty: start an embedded ``redis-server`` child (see ``proxy.store.embedded_redis``)."""
    data_dir: str = ".proxy-data"
    socket_timeout: float = Field(0.5, gt=0)
    socket_connect_timeout: float = Field(0.5, gt=0)
    hot_path_timeout: float = Field(2.0, gt=0)
    """Longest wait for an admit/settle reply. These share one pipelined connection, so under
    heavy load a reply queues behind others; a dead Redis is still seen at once (reset)."""
    max_connections: int = Field(1024, gt=0)
    """Pool size for admin calls and key look-ups (admit/settle share one pipelined link)."""
    startup_wait_seconds: float = Field(60.0, gt=0)
    """At start-up, how long to wait for Redis to answer and load its data before giving up
    (the proxy starts serving only once it has, and its bootstrap key is written)."""

    # --- high availability (redis+sentinel://, redis+cluster://; see proxy.store.topology) ---
    durability: Literal["async", "replicated"] = "async"
    """``replicated``: every admit and settle batch waits (``WAIT``) until a replica has it, so
    an acknowledged settle survives a failover; ``async`` trusts Redis's own replication."""
    replicas: int = Field(1, ge=1)
    """How many replicas must acknowledge a batch when ``durability = "replicated"``."""
    replica_ack_timeout: float = Field(0.5, gt=0)
    """Longest wait for that acknowledgement; past it the call fails as a store error."""

    @field_validator("url")
    @classmethod
    def _known_url(cls, value: str) -> str:
        if value:
            topology.parse(value)  # ValueError names the problem, never the password
        return value

    @model_validator(mode="after")
    def _replicated_is_possible(self) -> RedisConfig:
        if self.durability != "replicated":
            return self
        if self.replica_ack_timeout >= self.hot_path_timeout:
            raise ValueError("replica_ack_timeout must be below hot_path_timeout")
        if not self.url or self.url.startswith("unix:"):
            # The embedded server has no replica; a unix socket has no pipelined path to WAIT on.
            raise ValueError('durability = "replicated" needs a TCP url of a Redis with replicas')
        return self

    # --- end of high availability ---


class AuthConfig(_Strict):
    bootstrap_key_env: str = "PROXY_ADMIN_KEY"
    """Environment variable holding a cluster-admin key accepted without being stored."""
    cache_ttl_seconds: float = Field(1.0, ge=0, le=2.0)
    """Bounded by the 2 s revocation promise."""


class TimeoutConfig(_Strict):
    connect_seconds: float = Field(5.0, gt=0)
    read_seconds: float = Field(300.0, gt=0)
    """Longest silence tolerated between upstream bytes."""
    total_seconds: float = Field(600.0, gt=0)


class RoleLimits(_Strict):
    rps: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT)
    rpm: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT)
    rph: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT)
    rpd: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT)
    tpm: int | None = Field(None, gt=0, le=MAX_RATE_LIMIT)
    concurrency: int | None = Field(None, gt=0, le=MAX_CONCURRENCY)


class LimitsConfig(_Strict):
    lease_seconds: float = Field(120.0, gt=0)
    """How long a reservation survives a proxy that died; streams renew it while alive."""
    sweep_seconds: float | None = Field(None, gt=0)
    """How often expired leases of every org are reclaimed (default: a quarter lease)."""
    spool_dir: str = ""
    """Where settles Redis did not take are kept until it does (default: <data_dir>/spool)."""
    defaults: dict[Role, RoleLimits] = Field(default_factory=dict)
    max_end_users_per_month: int = Field(10_000, ge=0, le=10_000_000)
    """Distinct ``X-On-Behalf-Of`` ids one org may name per calendar month (UTC); a new one
    past it is refused (429 ``end_user_limit``). 0: no cap."""
    batch_settles: bool = False
    """Settles of one org handed over in one event-loop turn go to Redis in one script call
    (``proxy.ledger.settle_batches``): fewer script calls and less Redis CPU per request, for
    a little latency (docs/benchmark.md); off by default."""

    def sweep_interval(self) -> float:
        return self.sweep_seconds or max(self.lease_seconds / 4, 0.2)


class MeteringConfig(_Strict):
    unknown_price: Literal["refuse", "default"] = "refuse"
    default_price: PriceConfig | None = None
    default_max_output_tokens: int = Field(4096, gt=0)
    currency: str | None = Field("USD", pattern=r"^[A-Z]{3}$")
    """The ISO-4217 code prices are written in (reports name it; nothing is converted)."""
    cost_in_answers: bool = True
    """Each answer says what it cost, as settled: ``x-llm-cost`` (major units),
    ``x-llm-cost-nano`` and ``x-llm-cost-currency`` headers on buffered answers, ``cost`` and
    ``cost_nano`` in a stream's final usage object. Off: answers pass as the upstream sent."""

    @model_validator(mode="after")
    def _default_needs_price(self) -> MeteringConfig:
        if self.unknown_price == "default" and self.default_price is None:
            raise ValueError("unknown_price = 'default' needs [metering.default_price]")
        return self


class BudgetsConfig(_Strict):
    clamp_min_output_tokens: int = Field(256, gt=0)
    """The lowest output cap (per choice) a clamped request is admitted with: a request whose
    prompt plus this much output does not fit is refused, not clamped."""


class UsageConfig(_Strict):
    """The usage counters behind the usage and cost reports: how long each bucket width is
    kept, and how many distinct end users one org's bucket records before the rest are counted
    as ``(other)`` (client-chosen ids must not grow memory without bound)."""

    retention_1m_hours: int = Field(48, ge=1, le=24 * 400)
    retention_1h_days: int = Field(35, ge=1, le=800)
    retention_1d_days: int = Field(400, ge=1, le=3660)
    end_user_cap: int = Field(1000, ge=1, le=1_000_000)

    def keep_seconds(self, width: str) -> int:
        """How long past its end a bucket of this width (``1m``, ``1h``, ``1d``) is kept."""
        return {
            "1m": self.retention_1m_hours * 3600,
            "1h": self.retention_1h_days * 86400,
            "1d": self.retention_1d_days * 86400,
        }[width]

    def lua_policy(self) -> str:
        """What the ledger scripts take (``add_usage`` in ``ledger/lua/usage_counters.lua``)."""
        keeps = " ".join(str(self.keep_seconds(w)) for w in ("1m", "1h", "1d"))
        return f"{keeps} {self.end_user_cap}"


class WebhookConfig(_Strict):
    allow_private_targets: list[str] = Field(default_factory=list)
    """CIDRs that are allowed although private/loopback (e.g. ``127.0.0.0/8`` for tests)."""
    max_attempt_hours: float = Field(24.0, gt=0)
    connect_timeout_seconds: float = Field(5.0, gt=0)
    total_timeout_seconds: float = Field(10.0, gt=0)
    """Bounds one whole attempt: DNS lookup, connect, request and reading the answer."""
    poll_seconds: float = Field(0.5, gt=0)
    retry_base_seconds: float = Field(1.0, gt=0)
    """Back-off after the first failure; doubles per attempt (with jitter) up to the cap."""
    retry_max_seconds: float = Field(3600.0, gt=0)
    claim_timeout_seconds: float = Field(30.0, gt=0)
    """After this long, a delivery whose process died is taken over by another process."""
    concurrency: int = Field(16, ge=1)
    """Deliveries in flight at once, per process."""
    record_ttl_hours: float = Field(168.0, gt=0)
    """How long delivered and failed records stay visible in the deliveries endpoint."""

    @field_validator("allow_private_targets")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        import ipaddress

        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR: {exc}") from None
        return value

    @model_validator(mode="after")
    def _claim_outlives_attempt(self) -> WebhookConfig:
        # A live attempt must never be taken over, or one event could be sent twice at once.
        if self.claim_timeout_seconds <= self.total_timeout_seconds:
            raise ValueError("claim_timeout_seconds must exceed total_timeout_seconds")
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("retry_max_seconds must be at least retry_base_seconds")
        return self


class MetricsConfig(_Strict):
    token_env: str | None = "PROXY_METRICS_TOKEN"  # noqa: S105 - a variable name
    """When this variable is set, /metrics requires ``Authorization: Bearer <its value>``."""


class TelemetryConfig(_Strict):
    """OpenTelemetry (the ``otel`` extra): off unless ``otlp_endpoint`` is set."""

    otlp_endpoint: str | None = Field(None, pattern=r"^https?://")
    """An OTLP/HTTP collector's base URL (``http://collector:4318``): spans to ``/v1/traces``,
    metrics to ``/v1/metrics``. None: no telemetry, and no cost for it."""
    service_name: str = Field("llm-proxy", min_length=1)
    metrics_interval_seconds: float = Field(60.0, gt=0)
    """How often the GenAI client metrics are exported."""
