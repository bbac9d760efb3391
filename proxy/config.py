"""Configuration: one TOML file, validated by pydantic at start-up, with environment overrides.

Environment overrides use ``PROXY__SECTION__FIELD=value`` (values parsed as TOML scalars when
possible), plus the conventional ``REDIS_URL`` and ``PROXY_CONFIG`` (path of the TOML file).
"""

from __future__ import annotations

import os
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from proxy.store import topology

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "proxy.toml"

ProviderKind = Literal["openai", "anthropic", "azure", "bedrock", "gemini", "vertex"]
"""How the proxy speaks to an upstream: OpenAI's API (also Gemini's compatible endpoint, Groq,
Together, Fireworks, vLLM, Ollama...), Anthropic's Messages API, Azure OpenAI's paths, AWS
Bedrock's runtime API (SigV4-signed), the Gemini API, or Vertex AI (Gemini or Claude, by
``publisher``)."""
DialectName = Literal["openai", "anthropic", "bedrock", "gemini"]
"""The wire dialect a client speaks to the proxy (``proxy.dialects``); ``openai`` and ``azure``
upstreams both serve the first, ``gemini`` and Vertex's ``google`` publisher the last."""
_PRICE_PROVIDERS: dict[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure",
    "bedrock": "aws",
    "gemini": "google",
    "vertex": "google",
}
Role = Literal["cluster_admin", "org_admin", "member"]

# The admit script computes with Lua numbers (doubles): every limit it reads must be an integer
# a double holds exactly (<= 2**53 - 1). These maxima sit well inside that and above any real
# deployment: a trillion requests or tokens per window, a million requests in flight.
MAX_RATE_LIMIT = 10**12
MAX_CONCURRENCY = 10**6


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class PriceConfig(_Strict):
    """Major currency units per 1M tokens."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)
    """Cache reads (OpenAI's cached input, Anthropic's ``cache_read_input_tokens``)."""
    cache_write_input: Decimal | None = Field(None, ge=0)
    """Anthropic cache writes with the default 5-minute lifetime (default: 1.25x input)."""
    cache_write_1h_input: Decimal | None = Field(None, ge=0)
    """Anthropic cache writes with a 1-hour lifetime (default: 2x input)."""


class UpstreamConfig(_Strict):
    name: str = Field(min_length=1)
    base_url: str = ""
    """Required but for ``bedrock`` (default: ``https://bedrock-runtime.{region}.amazonaws.com``)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the upstream credential (never the value)."""
    kind: ProviderKind = "openai"
    api_version: str = "v1"
    """Azure only: ``v1`` uses Azure's ``/openai/v1/`` routes; a dated version (``2024-10-21``)
    uses ``/openai/deployments/{deployment}/…?api-version=…``."""
    anthropic_version: str = "2023-06-01"
    """Anthropic only: the ``anthropic-version`` sent when the client sent none."""
    region: str = Field("", pattern=r"^([a-z]{2}(-[a-z]+)+-\d{1,2})?$")
    """Bedrock only (required there): the AWS region requests are signed for."""
    project: str | None = None
    """Vertex only: the Google Cloud project (required for ``kind = "vertex"``)."""
    location: str = "us-central1"
    """Vertex only: the region (``global`` included) in the model's path."""
    publisher: Literal["google", "anthropic"] = "google"
    """Vertex only: whose models it serves — Gemini (``google``, Gemini's API) or Claude
    (``anthropic``, Anthropic's Messages API over ``:rawPredict``)."""
    credentials_file: str | None = None
    """Vertex only: a service-account JSON file; unset, Application Default Credentials."""
    price_provider: str | None = None
    """Provider id in the price database (``google``, ``groq``, ``together``…); default by kind."""
    cooldown_seconds: float = Field(30.0, ge=0)
    """After a failure that made a fallback try the next upstream, this one is tried last for
    this long (per proxy process)."""
    forward_headers: list[str] = Field(default_factory=list)
    """Request headers forwarded besides those the upstream's API reads (``accept``,
    ``user-agent``, ``openai-beta``): exact names, or prefixes ending in ``*``. Credentials,
    the client's provider-account headers and hop-by-hop headers are never forwarded."""

    @field_validator("forward_headers")
    @classmethod
    def _header_names(cls, value: list[str]) -> list[str]:
        for pattern in value:
            name = pattern.removesuffix("*")
            if not name or not all(c.isascii() and (c.isalnum() or c in "-_") for c in name):
                raise ValueError(f"{pattern!r} is not a header name (or a prefix ending in *)")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _kind_needs(self) -> UpstreamConfig:
        if self.kind == "bedrock":
            if not self.region:
                raise ValueError("a bedrock upstream needs its AWS region")
            if not self.base_url:
                url = f"https://bedrock-runtime.{self.region}.amazonaws.com"
                object.__setattr__(self, "base_url", url)
        elif not self.base_url:
            raise ValueError("base_url: Field required")
        return self

    def credential(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    @model_validator(mode="after")
    def _vertex_project(self) -> UpstreamConfig:
        if self.kind == "vertex" and not self.project:
            raise ValueError("kind = 'vertex' needs project (the Google Cloud project id)")
        return self

    @property
    def dialect(self) -> DialectName:
        if self.kind in ("anthropic", "bedrock"):
            return self.kind
        if self.kind == "vertex" and self.publisher == "anthropic":
            return "anthropic"
        return "gemini" if self.kind in ("gemini", "vertex") else "openai"

    @property
    def price_provider_id(self) -> str:
        if self.price_provider:
            return self.price_provider
        return "anthropic" if self.dialect == "anthropic" else _PRICE_PROVIDERS[self.kind]


class UpstreamChoice(_Strict):
    """One upstream of a model's fallback list, with an optional weight."""

    name: str = Field(min_length=1)
    weight: float | None = Field(None, gt=0)


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    """A model name, or a pattern with ``*`` (``claude-*``) matching many concrete names."""
    aliases: list[str] = Field(default_factory=list)
    upstream: str | list[str | UpstreamChoice]
    """One upstream's name, or a list tried in order on connect failure, 429 or 5xx."""
    upstream_model: str | None = None
    price: PriceConfig | None = None
    """Overrides the price database; required when the database does not know the model."""
    price_ref: str | None = None
    """Model name to look up in the price database, when it differs from ``upstream_model``."""
    max_output_tokens: int | None = Field(None, gt=0)
    encoding: str = "o200k_base"
    kind: Literal["chat", "embedding", "moderation", "image", "speech", "transcription"] = "chat"
    deployment: str | None = None
    """Azure: the deployment serving this model (default: the upstream model name)."""
    context_window: int = Field(1_000_000, gt=0)
    """Anthropic: the most input tokens the model accepts, which caps the reservation of a
    prompt. The default is the largest any Claude model takes (1M); set 200000 for models
    without the 1M option to reserve less for very long prompts and for documents."""

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name

    @property
    def choices(self) -> list[UpstreamChoice]:
        entries = [self.upstream] if isinstance(self.upstream, str) else self.upstream
        return [UpstreamChoice(name=e) if isinstance(e, str) else e for e in entries]

    @model_validator(mode="after")
    def _pattern_rules(self) -> ModelConfig:
        if isinstance(self.upstream, list) and not self.upstream:
            raise ValueError("upstream: the list is empty")
        if self.is_pattern and (self.aliases or self.upstream_model or self.deployment):
            raise ValueError(
                "a pattern's matches keep their own names: no aliases, upstream_model or deployment"
            )
        return self


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


class Settings(_Strict):
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig = AuthConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    metering: MeteringConfig = MeteringConfig()
    budgets: BudgetsConfig = BudgetsConfig()
    usage: UsageConfig = UsageConfig()
    webhooks: WebhookConfig = WebhookConfig()
    metrics: MetricsConfig = MetricsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstreams: duplicate name")
        seen: set[str] = set()
        kinds = {u.name: u for u in self.upstreams}
        for index, model in enumerate(self.models):
            choices = model.choices
            for choice in choices:
                if choice.name not in names:
                    raise ValueError(f"models.{index}.upstream: unknown upstream {choice.name!r}")
            if len({kinds[c.name].dialect for c in choices}) > 1:
                raise ValueError(
                    f"models.{index}.upstream: a client speaks one API, so one model's "
                    "upstreams are all Anthropic (direct or Vertex), all Bedrock, all Gemini "
                    "(direct or Vertex) or all OpenAI/Azure"
                )
            if len({c.name for c in choices}) != len(choices):
                raise ValueError(f"models.{index}.upstream: an upstream is listed twice")
            for public in (model.name, *model.aliases):
                if public in seen:
                    raise ValueError(f"models.{index}: name or alias {public!r} used twice")
                seen.add(public)
        return self

    def upstream(self, name: str) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.name == name)

    def spool_directory(self) -> Path:
        return Path(self.limits.spool_dir or Path(self.redis.data_dir) / "spool").resolve()


MeteringConfig.model_rebuild()


class ConfigError(Exception):
    """A configuration that cannot start the proxy; the message names the field."""


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _apply_env(data: dict[str, Any], environ: dict[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.startswith("PROXY__"):
            continue
        path = [part.lower() for part in name[len("PROXY__") :].split("__") if part]
        if not path:
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: {'.'.join(path)} is not a table")
        node[path[-1]] = _parse_env_value(raw)
    if environ.get("REDIS_URL"):
        data.setdefault("redis", {})["url"] = environ["REDIS_URL"]
    return data


def config_source(path: str | Path | None = None, environ: dict[str, str] | None = None) -> str:
    """Which file ``load_settings`` read, for the start-up log (an operator editing the wrong
    file saw no sign of it)."""
    env = os.environ if environ is None else environ
    config_path = Path(path or env.get("PROXY_CONFIG") or DEFAULT_CONFIG_PATH)
    if config_path.exists():
        return str(config_path.resolve())
    return f"none ({config_path} does not exist: defaults and PROXY_* variables only)"


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Read, override and validate; raises ConfigError naming the offending field."""
    env = dict(os.environ if environ is None else environ)
    named = path or env.get("PROXY_CONFIG")  # --config and PROXY_CONFIG alike must exist
    config_path = Path(named or DEFAULT_CONFIG_PATH)
    if named and not config_path.exists():
        raise ConfigError(f"{config_path}: no such file")
    try:
        data = tomllib.loads(config_path.read_text()) if config_path.exists() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    data = _apply_env(data, env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{config_path}: {problems}") from exc
