"""The application factory: middlewares, routes and the services' lifetimes."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler
from redis.exceptions import RedisError

from proxy.admin import health
from proxy.admin.app import create_admin_app, mount_admin
from proxy.admin.webhooks import delivery
from proxy.catalog.routes import build_routes
from proxy.config import ConfigError, Settings
from proxy.dialects import for_path
from proxy.errors import ApiError, error_response, store_unavailable
from proxy.gateway import lease_sweeper, llm_api, metrics
from proxy.gateway.auth import Authenticator
from proxy.gateway.body import BodiesInFlight
from proxy.gateway.request_context import OUTCOME
from proxy.gateway.request_log import add_request_id_header, request_log_middleware
from proxy.gateway.settle_spool import SettleSpool, SpoolUnwritable
from proxy.gateway.state import GATEWAY, Gateway
from proxy.http_protocol import BodyTimeout
from proxy.ledger.admission import Admission
from proxy.ledger.api_keys import KeyCreate, KeyStore, digest
from proxy.ledger.budgets import BudgetStore
from proxy.ledger.windows import Clock, system_clock
from proxy.providers import bedrock, redact
from proxy.providers.upstream import UpstreamClient
from proxy.store.client import Redis
from proxy.store.connection import connect, hot_path
from proxy.store.readiness import StoreNotReady, describe, wait_until_ready
from proxy.store.secret_box import ENV as SECRET_KEY_ENV
from proxy.store.secret_box import SecretBox, SecretKeyError

log = logging.getLogger(__name__)

BOOTSTRAP_KEY_ID = "key_bootstrap"
BOOTSTRAP_ORG = "cluster"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    dialect = for_path(request.path)
    try:
        return await handler(request)
    except ApiError as exc:
        response = exc.response(dialect)
        if getattr(exc, "close_connection", False):
            response.force_close()
        return response
    except BodyTimeout as exc:
        server = request.app[GATEWAY].settings.server
        response = error_response(
            408,
            f"The request body did not arrive in full within {server.body_deadline_seconds:g} s."
            if exc.deadline
            else f"The request body stopped arriving for {server.body_timeout_seconds:g} s.",
            code="request_timeout",
            dialect=dialect,
        )
        response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[GATEWAY].settings.server.max_body_bytes
        return error_response(
            413,
            f"Request body too large: the limit is {limit} bytes.",
            code="request_too_large",
            dialect=dialect,
        )
    except web.HTTPNotFound:
        return error_response(
            404,
            f"Unknown endpoint: {request.method} {request.path}",
            code="unknown_url",
            dialect=dialect,
        )
    except web.HTTPMethodNotAllowed as exc:
        return error_response(
            405,
            f"Method {request.method} is not allowed on {request.path}.",
            code="method_not_allowed",
            headers={"Allow": ",".join(sorted(exc.allowed_methods))},
            dialect=dialect,
        )
    except web.HTTPException as exc:
        return error_response(exc.status, exc.reason, code=str(exc.status), dialect=dialect)
    except (RedisError, ConnectionRefusedError) as exc:
        log.warning("store error on %s: %s", request.path, exc)
        outcome = request.get(OUTCOME)
        if outcome is not None:  # e.g. looking the key up: not an authentication failure
            outcome.decision = "store_unavailable"
        return store_unavailable().response(dialect)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(
            500, "Internal proxy error.", type="server_error", code="internal", dialect=dialect
        )


def create_app(settings: Settings, redis_url: str, clock: Clock = system_clock) -> web.Application:
    """Model routes (prices, encodings) are resolved here, so a bad config fails at once."""
    routes = build_routes(settings)
    redact.register(upstream.credential() for upstream in settings.upstreams)
    bedrock.check(settings.upstreams)  # botocore and AWS credentials, for signing upstreams
    app = web.Application(
        middlewares=[request_log_middleware, error_middleware],
        client_max_size=settings.server.max_body_bytes,
    )
    if settings.telemetry.otlp_endpoint:  # imported only when on: the otel extra is optional
        from proxy.gateway import telemetry

        telemetry.install(app, settings.telemetry)
    redis = connect(settings.redis, redis_url)
    keys = KeyStore(redis)
    try:
        box = SecretBox.from_env()
    except SecretKeyError as exc:
        raise ConfigError(str(exc)) from None
    app[GATEWAY] = Gateway(
        settings=settings,
        redis=redis,
        keys=keys,
        budgets=BudgetStore(redis, box),
        auth=Authenticator(keys, settings.auth.cache_ttl_seconds, clock),
        admission=Admission(
            redis,
            settings.limits.defaults,
            settings.limits.lease_seconds,
            clock,
            SettleSpool(settings.spool_directory()),
            hot_path=hot_path(settings.redis, redis_url),
            usage=settings.usage,
            end_user_cap=settings.limits.max_end_users_per_month,
            batch_settles=settings.limits.batch_settles,
        ),
        upstream=UpstreamClient(settings.timeouts),
        routes=routes,
        clock=clock,
        bodies=BodiesInFlight(settings.server.max_bodies_per_key),
    )
    app.on_response_prepare.append(add_request_id_header)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(delivery.delivery_ctx)
    app.cleanup_ctx.append(lease_sweeper.sweeper_ctx)
    health.add_routes(app)
    metrics.add_routes(app, settings.metrics)
    llm_api.add_routes(app)
    mount_admin(app, create_admin_app(app[GATEWAY]))
    return app


async def _services(app: web.Application) -> AsyncIterator[None]:
    gw = app[GATEWAY]
    await prepare_store(gw.settings, gw.redis)
    await gw.upstream.start()
    yield
    await gw.settles.wait(within=gw.settings.redis.hot_path_timeout + 5.0)
    await gw.admission.drain(grace=5.0)
    gw.admission.close()
    await gw.upstream.close()
    await gw.redis.aclose()


async def prepare_store(settings: Settings, redis: Redis) -> None:
    """Start-up, before the first request can arrive: Redis answers and has loaded its data
    (a bounded wait), then the scripts are loaded, the bootstrap admin key is written and
    webhook secrets still stored in plain text are sealed. Anything that fails raises
    ``StoreNotReady``: a proxy that skipped this would accept the old admin key and refuse the
    new one, with nothing said. The settle spool is checked first: a proxy whose spool cannot
    hold a settle would lose usage at the first Redis outage, so it does not start."""
    await check_spool(settings)
    await wait_until_ready(redis, settings.redis.startup_wait_seconds)
    try:
        for script in health.SCRIPTS:
            await script.load(redis)
        keys = KeyStore(redis)
        await _ensure_bootstrap_key(settings, keys)
        await _seal_webhook_secrets(BudgetStore(redis, SecretBox.from_env()), keys)
    except (RedisError, OSError) as exc:
        raise StoreNotReady(
            f"cannot load the scripts and the bootstrap key into Redis at {describe(redis)}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


async def check_spool(settings: Settings) -> None:
    """``StoreNotReady`` unless the spool directory takes a settle (write, fsync, remove)."""
    try:
        await asyncio.to_thread(SettleSpool(settings.spool_directory()).check)
    except SpoolUnwritable as exc:
        raise StoreNotReady(str(exc)) from exc


async def _seal_webhook_secrets(budgets: BudgetStore, keys: KeyStore) -> None:
    if budgets.box is None:
        log.warning(
            "%s is not set: webhook secrets are stored in Redis in plain text (set it to 32 "
            "random bytes, base64-encoded, e.g. `openssl rand -base64 32`)",
            SECRET_KEY_ENV,
        )
        return
    sealed = await budgets.seal_stored_secrets(await keys.orgs())
    if sealed:
        log.info("sealed %d webhook secrets stored in plain text before %s", sealed, SECRET_KEY_ENV)


async def _ensure_bootstrap_key(settings: Settings, keys: KeyStore) -> None:
    """The configured admin key exists as an ordinary cluster-admin key (digest only)."""
    plaintext = os.environ.get(settings.auth.bootstrap_key_env)
    if not plaintext:
        return
    if await keys.identity(plaintext) is not None:
        return
    existing = await keys.get(BOOTSTRAP_ORG, BOOTSTRAP_KEY_ID)
    if existing is not None and existing.status == "active":
        await keys.revoke(existing)
    await keys.create(
        KeyCreate(name="bootstrap admin", role="cluster_admin"),
        BOOTSTRAP_ORG,
        plaintext=plaintext,
        key_id=BOOTSTRAP_KEY_ID,
    )
    log.info("bootstrap admin key %s… registered", digest(plaintext)[:8])
