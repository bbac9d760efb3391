"""One key spraying invented names cannot grow Redis or ``/metrics`` without bound, and
another org is served throughout (issue 21's acceptance).

100,000 distinct ``X-On-Behalf-Of`` ids from one key: the first
``limits.max_end_users_per_month`` (10,000 by default) are served, every later new id is a
429 ``end_user_limit`` that writes nothing, so Redis's memory stops growing at the cap.
10,000 invented model names under a pattern model: metrics and usage counters take the
pattern, so ``/metrics`` does not grow with them. A bystander org's requests, interleaved
with the spray, are all served.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import Proxy, make_settings

from proxy.config import LimitsConfig, ModelConfig, PriceConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

IDS = 100_000
NAMES = 10_000
CAP = LimitsConfig().max_end_users_per_month
PATTERN = ModelConfig(
    name="mock-*",
    upstream="mock",
    encoding="o200k_base",
    max_output_tokens=100,
    price=PriceConfig(input="1", output="2"),
)
IN_FLIGHT = 48


async def _used_memory(store: aioredis.Redis) -> int:
    info = await store.info("memory")
    return int(info["used_memory"])


async def _metrics_size(proxy: Proxy) -> int:
    async with proxy.session.get(proxy.url + "/metrics") as response:
        assert response.status == 200
        return len(await response.read())


async def _spray(
    proxy: Proxy, key: str, bystander: str, bodies: list[tuple[dict[str, Any], dict[str, str]]]
) -> tuple[Counter[int], Counter[int]]:
    """Sends every (body, headers) with ``key``, IN_FLIGHT at a time, and one bystander request
    after every 200; returns the status counts of each."""
    sprayed: Counter[int] = Counter()
    served: Counter[int] = Counter()
    queue = iter(enumerate(bodies))
    url = proxy.url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=60)

    async def worker(session: aiohttp.ClientSession) -> None:
        for index, (body, headers) in queue:
            async with session.post(
                url, json=body, headers={"Authorization": f"Bearer {key}", **headers}
            ) as response:
                await response.read()
                sprayed[response.status] += 1
            if index % 200 == 0:
                async with session.post(
                    url,
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
                          "max_tokens": 5},
                    headers={"Authorization": f"Bearer {bystander}"},
                ) as response:  # fmt: skip
                    await response.read()
                    served[response.status] += 1

    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(IN_FLIGHT)))
    return sprayed, served


async def test_a_spray_of_end_user_ids_and_model_names_stays_within_its_bounds(
    start_proxy: Callable[..., Any], store: aioredis.Redis
) -> None:
    assert CAP == 10_000, "premise: the documented default cap"
    models = [*make_settings("http://127.0.0.1:9/v1").models, PATTERN]
    proxy: Proxy = await start_proxy(models=models)
    _, key = await proxy.create_key("sprayer")
    _, bystander = await proxy.create_key("bystander")
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5}  # fmt: skip

    # Up to the cap: every new id is served.
    first = [(chat, {"X-On-Behalf-Of": f"user-{i}"}) for i in range(CAP)]
    sprayed, served = await _spray(proxy, key, bystander, first)
    assert sprayed == Counter({200: CAP}), sprayed
    at_cap = await _used_memory(store)

    # Past it: 90,000 more new ids, each refused without a write.
    rest = [(chat, {"X-On-Behalf-Of": f"user-{i}"}) for i in range(CAP, IDS)]
    sprayed, served_more = await _spray(proxy, key, bystander, rest)
    served += served_more
    assert sprayed == Counter({429: IDS - CAP}), sprayed
    grown = await _used_memory(store) - at_cap
    assert grown < 1_000_000, f"Redis grew {grown} bytes on {IDS - CAP} refused ids"

    # 10,000 invented model names under the pattern (one end user already seen).
    before = await _metrics_size(proxy)
    names = [
        ({**chat, "model": f"mock-x{i}"}, {"X-On-Behalf-Of": "user-0"}) for i in range(NAMES)
    ]
    sprayed, served_more = await _spray(proxy, key, bystander, names)
    served += served_more
    assert sprayed == Counter({200: NAMES}), sprayed
    after = await _metrics_size(proxy)
    assert after - before < 4_000, f"/metrics grew {after - before} bytes on {NAMES} names"

    # The bystander org was served all along.
    assert served and set(served) == {200}, served
