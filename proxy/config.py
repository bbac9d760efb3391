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

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "proxy.toml"

ProviderKind = Literal["openai"]
Role = Literal["cluster_admin", "org_admin", "member"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(10 * 1024 * 1024, gt=0)
    workers: int = Field(1, ge=1)
    uvloop: bool = True
    shutdown_grace_seconds: float = Field(30.0, ge=0)


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
    rps: int | None = Field(None, gt=0)
    rpm: int | None = Field(None, gt=0)
    rph: int | None = Field(None, gt=0)
    rpd: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    concurrency: int | None = Field(None, gt=0)


class LimitsConfig(_Strict):
    lease_seconds: float = Field(120.0, gt=0)
    """How long a reservation survives a proxy that died; streams renew it while alive."""
    defaults: dict[Role, RoleLimits] = Field(default_factory=dict)


class MeteringConfig(_Strict):
    unknown_price: Literal["refuse", "default"] = "refuse"
    default_price: PriceConfig | None = None
    default_max_output_tokens: int = Field(4096, gt=0)

    @model_validator(mode="after")
    def _default_needs_price(self) -> MeteringConfig:
        if self.unknown_price == "default" and self.default_price is None:
            raise ValueError("unknown_price = 'default' needs [metering.default_price]")
        return self


class PriceConfig(_Strict):
    """Major currency units per 1M tokens."""

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(None, ge=0)


class UpstreamConfig(_Strict):
    name: str = Field(min_length=1)
    base_url: str = Field(min_length=1)
    api_key_env: str | None = None
    """Name of the environment variable holding the upstream credential (never the value)."""
    kind: ProviderKind = "openai"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    def credential(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class ModelConfig(_Strict):
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    upstream: str
    upstream_model: str | None = None
    price: PriceConfig | None = None
    """Overrides the price database; required when the database does not know the model."""
    price_ref: str | None = None
    """Model name to look up in the price database, when it differs from ``upstream_model``."""
    max_output_tokens: int | None = Field(None, gt=0)
    encoding: str = "o200k_base"
    kind: Literal["chat", "embedding"] = "chat"


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


class Settings(_Strict):
    server: ServerConfig = ServerConfig()
    redis: RedisConfig = RedisConfig()
    auth: AuthConfig = AuthConfig()
    timeouts: TimeoutConfig = TimeoutConfig()
    limits: LimitsConfig = LimitsConfig()
    metering: MeteringConfig = MeteringConfig()
    webhooks: WebhookConfig = WebhookConfig()
    metrics: MetricsConfig = MetricsConfig()
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_references(self) -> Settings:
        names = [u.name for u in self.upstreams]
        if len(set(names)) != len(names):
            raise ValueError("upstreams: duplicate name")
        seen: set[str] = set()
        for index, model in enumerate(self.models):
            if model.upstream not in names:
                raise ValueError(f"models.{index}.upstream: unknown upstream {model.upstream!r}")
            for public in (model.name, *model.aliases):
                if public in seen:
                    raise ValueError(f"models.{index}: name or alias {public!r} used twice")
                seen.add(public)
        return self

    def upstream(self, name: str) -> UpstreamConfig:
        return next(u for u in self.upstreams if u.name == name)


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


def load_settings(
    path: str | Path | None = None, environ: dict[str, str] | None = None
) -> Settings:
    """Read, override and validate; raises ConfigError naming the offending field."""
    env = dict(os.environ if environ is None else environ)
    config_path = Path(path or env.get("PROXY_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        data = tomllib.loads(config_path.read_text()) if config_path.exists() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: {exc}") from exc
    if path is not None and not config_path.exists():
        raise ConfigError(f"{config_path}: no such file")
    data = _apply_env(data, env)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{config_path}: {problems}") from exc
