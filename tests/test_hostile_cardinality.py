"""What one key can make the proxy keep, by inventing names (issue 21, items 3 and 4).

Item 4: under a pattern model, client-chosen model names must not become metric label values
or usage-counter fields: those take the configured pattern.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from conftest import Proxy, usage_record

from proxy.config import ModelConfig, PriceConfig

PATTERN = ModelConfig(
    name="mock-*",
    upstream="mock",
    encoding="o200k_base",
    max_output_tokens=100,
    price=PriceConfig(input="1", output="2"),
)
NAMES = 40
MESSAGES = [{"role": "user", "content": "hello"}]


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
