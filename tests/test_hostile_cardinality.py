"""What one key can make the proxy keep, by inventing names (issue 21, items 3 and 4).

Item 3: distinct ``X-On-Behalf-Of`` ids are capped per org per calendar month
(``limits.max_end_users_per_month``, default 10,000); a new id past the cap is a 429
``end_user_limit`` that keeps nothing, counted in ``llm_proxy_admission_decisions_total``.

Item 4: under a pattern model, client-chosen model names must not become metric label values
or usage-counter fields: those take the configured pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from conftest import Proxy, usage_record

from proxy.config import LimitsConfig, ModelConfig, PriceConfig

PATTERN = ModelConfig(
    name="mock-*",
    upstream="mock",
    encoding="o200k_base",
    max_output_tokens=100,
    price=PriceConfig(input="1", output="2"),
)
NAMES = 40
MESSAGES: Any = [{"role": "user", "content": "hello"}]


async def _with_pattern(start_proxy: Callable[..., Any]) -> Proxy:
    from conftest import make_settings

    models = [*make_settings("http://127.0.0.1:9/v1").models, PATTERN]
    proxy: Proxy = await start_proxy(models=models)
    return proxy


async def test_invented_model_names_grow_neither_metrics_nor_usage_counters(
    start_proxy: Callable[..., Any], store: aioredis.Redis
) -> None:
    proxy = await _with_pattern(start_proxy)
    _, key = await proxy.create_key("names")
    client = proxy.openai(key)
    for i in range(NAMES):
        answer = await client.chat.completions.create(model=f"mock-x{i}", messages=MESSAGES)
        assert answer.usage is not None and answer.usage.total_tokens > 0
    async with proxy.session.get(proxy.url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    assert 'model="mock-x' not in text
    assert 'model="mock-*"' in text  # they were counted, under the pattern
    # Usage counters: one model field set, whatever the names; the per-request records keep
    # the name each request used (they are bounded by their own retention, not by names).
    fields: set[str] = set()
    async for name in store.scan_iter("bp:{o:names}:*"):
        if await store.type(name) == "hash":
            fields.update(await store.hkeys(name))
    assert fields, "no usage counters were written"
    assert not [f for f in fields if "mock-x" in f], sorted(fields)[:5]
    assert [f for f in fields if "mock-*" in f]
    records = [usage_record(f) for _, f in await store.xrange("bp:{o:names}:usage")]
    assert {r["model"] for r in records} == {f"mock-x{i}" for i in range(NAMES)}


# --- item 3: distinct X-On-Behalf-Of ids per org -------------------------------------------------

END_USER_CAP = 20
CAP_FIELD = "max_end_users_per_month"


def _capped() -> dict[str, Any]:
    return {CAP_FIELD: END_USER_CAP}


async def _as(proxy: Proxy, key: str, end_user: str) -> tuple[int, Any]:
    async with proxy.session.post(
        proxy.url + "/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 5},
        headers={"Authorization": f"Bearer {key}", "X-On-Behalf-Of": end_user},
    ) as response:
        return response.status, await response.json()


async def _keys_of(store: aioredis.Redis, org: str) -> int:
    return len([k async for k in store.scan_iter(f"bp:{{o:{org}}}:*")])


async def test_distinct_end_users_per_org_are_capped_and_other_orgs_are_served(
    start_proxy: Callable[..., Any], store: aioredis.Redis
) -> None:
    proxy: Proxy = await start_proxy(limits=_capped())
    _, key = await proxy.create_key("spray")
    _, other = await proxy.create_key("bystander")
    for i in range(END_USER_CAP):
        status, body = await _as(proxy, key, f"user-{i}")
        assert status == 200, body
    grown = await _keys_of(store, "spray")
    # Past the cap: a new id is refused, clearly, and counted.
    refused = []
    for i in range(END_USER_CAP, 3 * END_USER_CAP):
        status, body = await _as(proxy, key, f"user-{i}")
        refused.append((status, body))
    assert all(status == 429 for status, _ in refused), refused[0]
    error = refused[0][1]["error"]
    assert error["code"] == "end_user_limit" and error["param"] == "X-On-Behalf-Of"
    assert str(END_USER_CAP) in error["message"]
    # Nothing was kept for the refused ids; ids already seen, and other orgs, are served.
    assert await _keys_of(store, "spray") == grown
    assert (await _as(proxy, key, "user-0"))[0] == 200
    assert (await _as(proxy, other, "someone-new"))[0] == 200
    async with proxy.session.get(proxy.url + "/metrics") as response:
        text = await response.text()
    assert 'llm_proxy_admission_decisions_total{decision="end_user_limit"}' in text


async def test_the_end_user_cap_is_a_documented_setting_with_a_default() -> None:
    field = LimitsConfig.model_fields.get(CAP_FIELD)
    assert field is not None and field.default == 10_000
    assert getattr(LimitsConfig(), CAP_FIELD) == 10_000
