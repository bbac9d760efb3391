"""Reading the file: TOML, then ``PROXY__SECTION__FIELD`` overrides, validated as one
``Settings``."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from proxy.config.base import _Strict
from proxy.config.models import ModelConfig, UpstreamConfig
from proxy.config.sections import (
    AuthConfig,
    BudgetsConfig,
    LimitsConfig,
    MeteringConfig,
    MetricsConfig,
    RedisConfig,
    ServerConfig,
    TelemetryConfig,
    TimeoutConfig,
    UsageConfig,
    WebhookConfig,
)

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent.parent / "config" / "proxy.toml"


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
