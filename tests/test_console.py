"""The operator console in a real browser: Debian's headless Chromium driven by Playwright.

Every test signs in through the page itself, acts as an operator would and checks what the
page shows against the API. The browser may reach the proxy only: any request to another
origin is aborted and recorded, and CSP violations and page errors fail the test. Each test
saves a screenshot under ``tests/artifacts/console/`` (printed at the end of the test).

Chromium comes from Debian (``scripts/install-chromium.sh``, run by the ``chromium`` fixture
when it is missing); Playwright's own browser download is never used.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import REPO, Proxy
from helpers import sdk_chat, user_messages
from playwright.async_api import Browser, Page, Request, Route, async_playwright, expect

# Browser tests: slow, and the first may install Chromium.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ARTIFACTS = REPO / "tests" / "artifacts" / "console"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
XSS_NAME = '<img src=x onerror="window.__xss=1">'
USAGE_COSTS = "/api/v1/llm/usage/costs"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed by the project's script when missing (a failure here is
    a failed test, never a skip: CI must run the browser tests)."""
    found = shutil.which("chromium")
    if found:
        return found
    script = REPO / "scripts" / "install-chromium.sh"
    try:
        result = subprocess.run(
            ["bash", str(script)], capture_output=True, text=True, timeout=900, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script} did not finish within 900 s (apt-get install chromium)")
    found = shutil.which("chromium")
    if result.returncode != 0 or not found:
        pytest.fail(
            f"{script} could not install Chromium (exit {result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        )
    return found


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@dataclass
class Console:
    """A console tab that may talk to the proxy only."""

    page: Page
    origin: str
    name: str
    outside: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    async def sign_in(self, key: str, expect_role: str | None = "cluster_admin") -> None:
        await self.page.goto(self.origin + "/ui")
        await self.page.fill("#admin-key", key)
        await self.page.click("#sign-in-form button[type=submit]")
        if expect_role is not None:
            await expect(self.page.locator("#who")).to_contain_text(expect_role)

    async def view(self, name: str) -> None:
        await self.page.click(f"nav button[data-view={name}]")
        await expect(self.page.locator(f"#view-{name}")).to_be_visible()

    def gauge(self, budget_id: str) -> Any:
        return self.page.locator(f'[data-budget-id="{budget_id}"]')

    async def screenshot(self) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}.png"
        await self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path

    def assert_clean(self) -> None:
        assert self.outside == [], f"requests left the proxy's origin: {self.outside}"
        assert self.problems == [], f"CSP violations or page errors: {self.problems}"


async def open_console(browser: Browser, proxy: Proxy, name: str) -> Console:
    page = await browser.new_page(viewport={"width": 1280, "height": 860})
    origin = proxy.url
    console = Console(page, origin, name)

    async def only_the_proxy(route: Route, request: Request) -> None:
        parts = urlsplit(request.url)
        if f"{parts.scheme}://{parts.netloc}" == origin or parts.scheme in ("data", "blob"):
            await route.continue_()
        else:
            console.outside.append(request.url)
            await route.abort("blockedbyclient")

    await page.route("**/*", only_the_proxy)
    page.on(
        "console",
        lambda message: (
            console.problems.append(message.text)
            if "Content Security Policy" in message.text or "Refused to" in message.text
            else None
        ),
    )
    page.on("pageerror", lambda error: console.problems.append(f"page error: {error}"))
    return console


async def chat(client: openai.AsyncOpenAI, tokens: int = 50) -> None:
    await sdk_chat(
        client, "gpt-4o-mini", user_messages("hello"), output_tokens=tokens, max_tokens=tokens
    )


async def put_budget(proxy: Proxy, path: str, key: str | None = None, **spec: Any) -> Any:
    body = {
        "period": "daily",
        "limit_kind": "tokens",
        "limit": 1000,
        "thresholds": [{"pct": 50, "action": "alert"}, {"pct": 100, "action": "block"}],
        **spec,
    }
    status, answer = await proxy.admin("PUT", f"/api/v1/llm/budgets/{path}", body, key=key)
    assert status == 200, answer
    return answer


async def test_sign_in_keeps_the_key_in_session_storage_only(
    proxy: Proxy, browser: Browser
) -> None:
    console = await open_console(browser, proxy, "sign-in")
    await console.sign_in("sk-bp-not-a-key", expect_role=None)
    await expect(console.page.locator("#sign-in-error")).to_contain_text("Incorrect API key")
    assert await console.page.evaluate("sessionStorage.length") == 0

    await console.sign_in(proxy.admin_key)
    await expect(console.page.locator("#who")).to_contain_text("key_bootstrap")
    stored = await console.page.evaluate("Object.values(sessionStorage)")
    assert stored == [proxy.admin_key]
    assert await console.page.evaluate("localStorage.length") == 0
    assert await console.page.evaluate("document.cookie") == ""
    assert proxy.admin_key not in console.page.url
    await console.screenshot()

    # A member key is not an operator's key.
    _, member = await proxy.create_key("acme")
    await console.page.click("#sign-out")
    await console.sign_in(member, expect_role=None)
    await expect(console.page.locator("#sign-in-error")).to_contain_text("org_admin or cluster")
    assert await console.page.evaluate("sessionStorage.length") == 0
    console.assert_clean()


async def test_a_budget_gauge_moves_while_traffic_flows(proxy: Proxy, browser: Browser) -> None:
    key_id, key = await proxy.create_key("acme", name="checkout-service")
    await proxy.create_key("acme", name="search-indexer")
    budget = await put_budget(
        proxy,
        f"apikey/{key_id}",
        limit=2000,
        thresholds=[{"pct": 50, "action": "alert"}, {"pct": 90, "action": "block"}],
    )
    await put_budget(
        proxy,
        "org/acme",
        owner="cluster",
        period="monthly",
        limit_kind="cost",
        limit=25,
        thresholds=[{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}],
    )
    console = await open_console(browser, proxy, "budget-gauge")
    await console.sign_in(proxy.admin_key)
    gauge = console.gauge(budget["id"])
    await expect(gauge.locator(".gauge-pct")).to_have_text("0.00 %")
    await expect(gauge.locator(".gauge-scope")).to_contain_text("checkout-service")
    await expect(gauge).to_contain_text("resets in")

    client = proxy.openai(key)
    for _ in range(3):
        await chat(client, tokens=100)
    _, listing = await proxy.admin("GET", f"/api/v1/llm/budgets/apikey/{key_id}")
    pct = listing["data"][0]["spend"]["pct"]
    assert pct > 0
    # No reload: the page polls the budgets API.
    await expect(gauge.locator(".gauge-pct")).to_have_text(f"{pct:.2f} %", timeout=10_000)
    await expect(gauge.locator(".gauge-status")).to_have_text("ok")

    # An operator lowers the limit below the spend: blocked at once, and the page shows it.
    spent = int(listing["data"][0]["spend"]["tokens_spent"])
    await put_budget(
        proxy,
        f"apikey/{key_id}",
        limit=spent,
        thresholds=[{"pct": 50, "action": "alert"}, {"pct": 90, "action": "block"}],
    )
    await expect(gauge.locator(".gauge-status")).to_have_text("blocked", timeout=10_000)
    await console.screenshot()
    console.assert_clean()


async def test_a_key_is_created_and_revoked(proxy: Proxy, browser: Browser) -> None:
    await proxy.create_key("acme", name="existing")
    console = await open_console(browser, proxy, "keys")
    await console.sign_in(proxy.admin_key)
    await console.view("keys")
    page = console.page
    await page.click("#key-new")
    await page.fill("#kf-org", "acme")
    await page.fill("#kf-name", "console-made")
    await page.fill('#kf-limits input[data-limit="rpm"]', "600")
    await page.click("#kf-submit")
    plaintext_box = page.locator("#key-created-value")
    await expect(plaintext_box).to_contain_text("sk-bp-")
    plaintext = (await plaintext_box.text_content() or "").strip()
    row = page.locator("#keys-table tbody tr", has_text="console-made")
    await expect(row).to_contain_text("rpm 600")
    await console.screenshot()

    # The plaintext works, once: the proxy keeps only its digest.
    client = proxy.openai(plaintext)
    await chat(client)
    _, keys = await proxy.admin("GET", "/api/v1/keys?org_id=acme")
    made = next(k for k in keys["data"] if k["name"] == "console-made")
    assert made["limits"]["rpm"] == 600
    await page.click("#key-created-done")
    await expect(page.locator("#key-created")).to_be_hidden()
    assert plaintext not in await page.content()

    await row.get_by_role("button", name="Revoke").click()
    await row.get_by_role("button", name="Confirm revoke").click()
    await expect(row.locator(".key-status")).to_have_text("revoked")
    with pytest.raises(openai.AuthenticationError):
        await chat(client)
    console.assert_clean()


async def test_key_limits_and_models_are_edited(proxy: Proxy, browser: Browser) -> None:
    key_id, _ = await proxy.create_key("acme", name="editable", limits={"rpm": 10})
    console = await open_console(browser, proxy, "key-edit")
    await console.sign_in(proxy.admin_key)
    await console.view("keys")
    page = console.page
    row = page.locator(f'#keys-table tr[data-key-id="{key_id}"]')
    await row.get_by_role("button", name="Edit").click()
    await page.fill('#kf-limits input[data-limit="rpm"]', "")
    await page.fill('#kf-limits input[data-limit="tpm"]', "5000")
    await page.uncheck("#kf-all-models")
    await page.check('#kf-models input[value="gpt-4o"]')
    await page.click("#kf-submit")
    await expect(row).to_contain_text("tpm 5000")
    _, key = await proxy.admin("GET", f"/api/v1/keys/{key_id}")
    assert key["limits"]["rpm"] is None and key["limits"]["tpm"] == 5000
    assert key["models"] == ["gpt-4o"]

    # The API's own message, as it names the field.
    await row.get_by_role("button", name="Edit").click()
    await page.fill('#kf-limits input[data-limit="rps"]', "-3")
    await page.click("#kf-submit")
    await expect(page.locator("#key-form-error")).to_contain_text("'limits.rps'")
    await console.screenshot()
    console.assert_clean()


async def test_budgets_are_created_edited_and_deleted_with_the_apis_messages(
    proxy: Proxy, browser: Browser
) -> None:
    await proxy.create_key("acme", name="svc")
    console = await open_console(browser, proxy, "budget-form")
    await console.sign_in(proxy.admin_key)
    page = console.page
    await page.click("#budget-new")
    await page.select_option("#bf-org", "acme")
    await page.select_option("#bf-period", "weekly")
    await page.select_option("#bf-kind", "cost")
    await page.fill("#bf-limit", "-5")
    await page.click("#budget-form button[type=submit]")
    bad = {
        "period": "weekly",
        "limit_kind": "cost",
        "limit": -5,
        "thresholds": [{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}],
        "owner": "org",
        "webhook_url": None,
    }
    status, error = await proxy.admin("PUT", "/api/v1/llm/budgets/org/acme", bad)
    assert status == 400
    await expect(page.locator("#budget-form-error")).to_have_text(error["error"]["message"])

    await page.fill("#bf-limit", "12.5")
    await page.click("#budget-form button[type=submit]")
    await expect(page.locator("#budget-form")).to_be_hidden()
    _, listing = await proxy.admin("GET", "/api/v1/llm/budgets/org/acme")
    (created,) = listing["data"]
    assert (created["period"], created["limit_kind"], created["limit"]) == ("weekly", "cost", 12.5)
    gauge = console.gauge(created["id"])
    await expect(gauge).to_contain_text("12.50")

    await gauge.get_by_role("button", name="Edit").click()
    await page.fill("#bf-limit", "40")
    await page.locator("#bf-thresholds .th-pct").first.fill("60")
    await page.click("#budget-form button[type=submit]")
    await expect(gauge).to_contain_text("40.00")
    _, listing = await proxy.admin("GET", "/api/v1/llm/budgets/org/acme")
    assert listing["data"][0]["id"] == created["id"]
    assert listing["data"][0]["thresholds"][0] == {"pct": 60, "action": "alert"}
    await console.screenshot()

    await gauge.get_by_role("button", name="Delete").click()
    await gauge.get_by_role("button", name="Confirm delete").click()
    await expect(gauge).to_have_count(0)
    _, listing = await proxy.admin("GET", "/api/v1/llm/budgets/org/acme")
    assert listing["data"] == []
    console.assert_clean()


async def test_an_org_admin_sees_only_their_org(proxy: Proxy, browser: Browser) -> None:
    _, acme_admin = await proxy.create_key("acme", name="acme-admin", role="org_admin")
    acme_key, _ = await proxy.create_key("acme", name="acme-service")
    globex_key, _ = await proxy.create_key("globex", name="globex-secret-service")
    await put_budget(proxy, f"apikey/{acme_key}")
    await put_budget(proxy, "org/acme", owner="cluster", limit=5000)
    hidden = await put_budget(proxy, f"apikey/{globex_key}")
    await put_budget(proxy, "org/globex", limit=7777)

    console = await open_console(browser, proxy, "org-admin")
    await console.sign_in(acme_admin, expect_role="org_admin")
    page = console.page
    await expect(page.locator(".gauge")).to_have_count(2)
    await expect(console.gauge(hidden["id"])).to_have_count(0)
    # The cluster's ceiling is shown, read-only.
    ceiling = page.locator(".gauge", has_text="cluster ceiling")
    await expect(ceiling).to_contain_text("read-only")
    await console.screenshot()

    await console.view("keys")
    await expect(page.locator("#keys-table tbody tr")).to_have_count(2)
    await page.click("#key-new")
    assert await page.locator("#kf-org").input_value() == "acme"
    assert await page.locator("#kf-org").get_attribute("readonly") is not None
    await page.click("#kf-cancel")
    for view in ("budgets", "keys", "events", "usage"):
        await console.view(view)
        text = await page.locator("body").inner_text()
        assert "globex" not in text, view
    console.assert_clean()


async def test_markup_in_names_and_urls_renders_as_text(proxy: Proxy, browser: Browser) -> None:
    key_id, _ = await proxy.create_key("acme", name=XSS_NAME)
    markup_url = "https://hooks.example/<script>window.__xss=2</script>"
    await put_budget(proxy, f"apikey/{key_id}", webhook_url=markup_url)
    console = await open_console(browser, proxy, "markup-as-text")
    await console.sign_in(proxy.admin_key)
    page = console.page
    scope = page.locator(".gauge .gauge-scope")
    await expect(scope).to_contain_text(XSS_NAME)
    await expect(page.locator(".gauge .webhook")).to_contain_text(markup_url)
    await console.view("keys")
    await expect(page.locator("#keys-table .key-name", has_text=XSS_NAME)).to_have_count(1)
    await console.screenshot()
    assert await page.locator("main img").count() == 0
    assert await page.locator("main script").count() == 0
    assert await page.evaluate("window.__xss") is None
    console.assert_clean()


async def test_threshold_events_and_webhook_deliveries_are_listed(
    start_proxy: Any, browser: Browser
) -> None:
    failing = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=500, text="receiver down")

    failing.router.add_post("/hook", refuse)
    receiver = TestServer(failing, host="127.0.0.1")
    await receiver.start_server()
    try:
        proxy: Proxy = await start_proxy(
            webhooks={"allow_private_targets": ["127.0.0.0/8"], "retry_base_seconds": 60}
        )
        key_id, key = await proxy.create_key("acme", name="alerting")
        await put_budget(
            proxy, f"apikey/{key_id}", limit=100, webhook_url=str(receiver.make_url("/hook"))
        )
        await chat(proxy.openai(key), tokens=60)

        async def attempted() -> Any:
            _, answer = await proxy.admin("GET", "/api/v1/webhooks/deliveries")
            return [d for d in answer["data"] if d["attempts"] >= 1 and d["last_error"]]

        (delivery,) = await asyncio.wait_for(_poll(attempted), 20)
        console = await open_console(browser, proxy, "events")
        await console.sign_in(proxy.admin_key)
        await console.view("events")
        page = console.page
        await expect(page.locator("#events-table tbody tr")).to_have_count(1)
        await expect(page.locator("#events-table")).to_contain_text("threshold_alert")
        row = page.locator(f'#deliveries-table tr[data-event-id="{delivery["event_id"]}"]')
        await expect(row).to_contain_text(delivery["status"])
        await expect(row.locator(".last-error")).to_have_text(delivery["last_error"])
        await expect(row).to_contain_text(str(receiver.make_url("/hook")))
        await console.screenshot()
        console.assert_clean()
    finally:
        await receiver.close()


async def _poll(check: Any) -> Any:
    while True:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)


async def test_the_console_and_docs_work_with_every_other_origin_blocked(
    proxy: Proxy, browser: Browser
) -> None:
    key_id, key = await proxy.create_key("acme", name="offline")
    budget = await put_budget(proxy, f"apikey/{key_id}")
    await chat(proxy.openai(key))
    console = await open_console(browser, proxy, "offline")
    page = console.page
    answer = await page.goto(proxy.url + "/ui")
    assert answer is not None
    headers = await answer.all_headers()
    assert "script-src 'self'" in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    await console.sign_in(proxy.admin_key)
    await expect(console.gauge(budget["id"]).locator(".gauge-pct")).not_to_have_text("0.00 %")
    for view in ("keys", "events", "usage", "budgets"):
        await console.view(view)
    await expect(page.locator("#keys-table tbody tr")).to_have_count(2)

    answer = await page.goto(proxy.url + "/docs")
    assert answer is not None
    assert "default-src 'none'" in (await answer.all_headers())["content-security-policy"]
    operation = page.locator(".opblock-summary-path", has_text="/api/v1/keys").first
    await expect(operation).to_be_visible(timeout=15_000)
    await expect(page.locator(".information-container")).to_contain_text("llm-proxy")
    await console.screenshot()
    console.assert_clean()


async def test_usage_draws_cost_per_day_and_totals_equal_the_usage_api(
    proxy: Proxy, browser: Browser
) -> None:
    _, key = await proxy.create_key("acme", name="usage-a")
    client = proxy.openai(key)
    await chat(client, tokens=80)
    await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=40
    )
    console = await open_console(browser, proxy, "usage")
    await console.sign_in(proxy.admin_key)
    await console.view("usage")
    page = console.page
    await page.select_option("#usage-group", "model")
    await page.click("#usage-form button[type=submit]")
    await expect(page.locator("#usage-chart")).to_have_attribute("data-state", "ready")
    start = await page.locator("#usage-start").input_value()
    end = await page.locator("#usage-end").input_value()
    first = datetime.fromisoformat(start).replace(tzinfo=UTC)
    last = datetime.fromisoformat(end).replace(tzinfo=UTC) + timedelta(days=1)
    url = f"{USAGE_COSTS}?start_time={int(first.timestamp())}&end_time={int(last.timestamp())}"
    status, total = await proxy.admin("GET", url + "&group_by=model")
    assert status == 200, total
    assert int(total["total_cost_nano"]) > 0
    await expect(page.locator("#usage-total-nano")).to_have_text(total["total_cost_nano"])
    for row in total["data"]:
        # The row whose first cell is exactly this model ("gpt-4o" is in "gpt-4o-mini" too).
        name = page.get_by_role("cell", name=row["model"], exact=True)
        line = page.locator("#usage-table tbody tr", has=name)
        await expect(line).to_contain_text(row["cost_nano"])
    await console.screenshot()
    console.assert_clean()


async def test_usage_says_when_the_usage_api_is_missing(proxy: Proxy, browser: Browser) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.get(
            proxy.url + USAGE_COSTS + "?start_time=0&end_time=1",
            headers={"Authorization": f"Bearer {proxy.admin_key}"},
        ) as probe:
            served = probe.status != 404
    console = await open_console(browser, proxy, "usage-state")
    await console.sign_in(proxy.admin_key)
    await console.view("usage")
    chart = console.page.locator("#usage-chart")
    await expect(chart).to_have_attribute("data-state", "ready" if served else "unavailable")
    if not served:
        await expect(console.page.locator("#usage-status")).to_contain_text("not available")
    await console.screenshot()
    console.assert_clean()


async def test_end_user_budgets_show_as_gauges(proxy: Proxy, browser: Browser) -> None:
    """End-user budgets (issue #17) share the budgets view."""
    path = "/api/v1/llm/budgets/external-user/user-42"
    spec = {
        "period": "daily",
        "limit_kind": "cost",
        "limit": 3,
        "thresholds": [{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}],
    }
    status, created = await proxy.admin("PUT", path, spec)
    assert status == 200, created
    console = await open_console(browser, proxy, "end-user-budgets")
    await console.sign_in(proxy.admin_key)
    gauge = console.gauge(created["id"])
    await expect(gauge.locator(".gauge-scope")).to_have_text("end user user-42")
    await expect(gauge.locator(".gauge-pct")).to_have_text("0.00 %")
    await gauge.get_by_role("button", name="Delete").click()
    await gauge.get_by_role("button", name="Confirm delete").click()
    await expect(gauge).to_have_count(0)
    await console.screenshot()
    console.assert_clean()


async def test_cards_say_owner_units_currency_alerts_and_top_spenders(
    proxy: Proxy, browser: Browser
) -> None:
    """Issue 23 item 5: amounts with their currency, event spend with units, the chart axis
    with its unit, an owner badge that does not read "org budget" on a key's card, an alert
    that fired, and the end-user default card listing the top spenders against it."""
    key_id, key = await proxy.create_key("acme", name="labelled")
    key_budget = await put_budget(proxy, f"apikey/{key_id}", limit=100)
    org_budget = await put_budget(proxy, "org/acme", limit_kind="cost", limit=5)
    default = await put_budget(proxy, "external-user-default?org_id=acme", limit=1000)
    client = proxy.openai(key)
    for user, tokens in (("alice", 60), ("bob", 20)):
        await sdk_chat(
            client,
            "gpt-4o-mini",
            user_messages("hello"),
            output_tokens=tokens,
            max_tokens=tokens,
            headers={"X-On-Behalf-Of": user},
        )
    console = await open_console(browser, proxy, "labels")
    await console.sign_in(proxy.admin_key)
    card = console.gauge(key_budget["id"])
    await expect(card.locator(".badge.owner-org")).to_have_text("set by the org")
    await expect(card.locator(".alert-fired")).to_contain_text("alert fired at 50%")
    await expect(card.locator(".gauge-amount")).to_contain_text("tokens of 100 tokens")
    org_card = console.gauge(org_budget["id"])
    await expect(org_card.locator(".badge.owner-org")).to_have_text("org budget")
    await expect(org_card.locator(".gauge-amount")).to_contain_text("USD")
    spenders = console.gauge(default["id"]).locator(".top-spenders")
    await expect(spenders).to_contain_text("alice")
    await expect(spenders.locator(".spender").first).to_contain_text("alice")
    await expect(spenders).to_contain_text("tokens")
    await console.screenshot()
    await console.view("events")
    await expect(console.page.locator("#events-table tbody")).to_contain_text("tokens")
    console.name = "labels-events"
    await console.screenshot()
    await console.view("usage")
    await console.page.click("#usage-form button[type=submit]")
    await expect(console.page.locator("#usage-chart")).to_have_attribute("data-state", "ready")
    await expect(console.page.locator("#usage-chart .axis-unit")).to_contain_text("(USD)")
    console.name = "labels-usage"
    await console.screenshot()
    console.assert_clean()


async def test_keys_show_expiry_last_use_metadata_and_rotate(
    proxy: Proxy, browser: Browser
) -> None:
    """Issue 23 item 6 in the console: expiry, last use and metadata listed and edited; a
    rotation with a grace period shows the new secret once, and both secrets work."""
    expires = int(datetime.now(UTC).timestamp()) + 86400
    key_id, old = await proxy.create_key(
        "acme", name="rotating", expires_at=expires, metadata={"team": "search"}
    )
    await chat(proxy.openai(old), tokens=5)
    console = await open_console(browser, proxy, "keys-lifecycle")
    await console.sign_in(proxy.admin_key)
    await console.view("keys")
    row = console.page.locator(f'#keys-table tr[data-key-id="{key_id}"]')
    await expect(row.locator(".key-metadata")).to_have_text("team=search")
    shown = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M")
    await expect(row.locator(".key-expires")).to_contain_text(shown)
    await expect(row.locator(".key-last-used")).not_to_have_text("never")
    await row.get_by_role("button", name="Edit").click()
    await console.page.fill("#kf-metadata", "team=ads\nticket=OPS-1")
    await console.page.fill("#kf-expires", "")
    await console.page.click("#kf-submit")
    await expect(row.locator(".key-metadata")).to_have_text("team=ads ticket=OPS-1")
    await expect(row.locator(".key-expires")).to_have_text("never")
    await row.get_by_role("button", name="Rotate").click()
    await row.locator("input.grace").fill("600")
    await row.get_by_role("button", name="Confirm rotate").click()
    secret = console.page.locator("#key-created-value")
    await expect(secret).to_contain_text("sk-bp-")
    await expect(console.page.locator("#key-created-title")).to_contain_text("old one works until")
    new = await secret.text_content()
    assert new and new != old
    await console.screenshot()
    _, record = await proxy.admin("GET", f"/api/v1/keys/{key_id}")
    assert record["metadata"] == {"team": "ads", "ticket": "OPS-1"}
    assert record["expires_at"] is None and record["rotated_at"] is not None
    for secret_key in (old, new):
        await chat(proxy.openai(secret_key), tokens=5)  # both, during the grace period
    console.assert_clean()
