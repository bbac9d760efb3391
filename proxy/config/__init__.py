"""Configuration: one TOML file, validated by pydantic at start-up, with environment overrides.

Environment overrides use ``PROXY__SECTION__FIELD=value`` (values parsed as TOML scalars when
possible), plus the conventional ``REDIS_URL`` and ``PROXY_CONFIG`` (path of the TOML file).

One module per part (``base``, ``models``, ``sections``, ``loading``); everything is imported
from here."""

from proxy.config.base import MAX_CONCURRENCY, MAX_RATE_LIMIT, DialectName, ProviderKind, Role
from proxy.config.loading import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    config_source,
    load_settings,
)
from proxy.config.models import ModelConfig, PriceConfig, UpstreamChoice, UpstreamConfig
from proxy.config.sections import (
    AuthConfig,
    BudgetsConfig,
    LimitsConfig,
    MeteringConfig,
    MetricsConfig,
    RedisConfig,
    RoleLimits,
    ServerConfig,
    TelemetryConfig,
    TimeoutConfig,
    UsageConfig,
    WebhookConfig,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_CONCURRENCY",
    "MAX_RATE_LIMIT",
    "AuthConfig",
    "BudgetsConfig",
    "ConfigError",
    "DialectName",
    "LimitsConfig",
    "MeteringConfig",
    "MetricsConfig",
    "ModelConfig",
    "PriceConfig",
    "ProviderKind",
    "RedisConfig",
    "Role",
    "RoleLimits",
    "ServerConfig",
    "Settings",
    "TelemetryConfig",
    "TimeoutConfig",
    "UpstreamChoice",
    "UpstreamConfig",
    "UsageConfig",
    "WebhookConfig",
    "config_source",
    "load_settings",
]
