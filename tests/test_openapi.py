"""The OpenAPI document (``/openapi.json``): valid OpenAPI 3.1, complete, and true.

* It validates against the OpenAPI 3.1 schema (``openapi-spec-validator``) and declares every
  route the application serves.
* Real answers of every admin endpoint, on real data, match the document's response models.
* A schemathesis run against ``llm-proxy serve`` (real Redis, the mock upstream) sends
  generated requests to every operation — the document's examples point its path parameters
  at objects that exist — and finds no server error and no answer (status, content type,
  body) the document does not describe. ``SCHEMATHESIS_EXAMPLES`` (per operation, default 50)
  and ``SCHEMATHESIS_SEED`` widen or reproduce a run.
* The console and docs pages are served under their security headers, with no inline script
  or style, and only the files they list.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import ADMIN_KEY, REPO, Proxy, eventually, start_proxy_process, write_config
from openapi_spec_validator import validate
from pydantic import BaseModel

from proxy.admin import schemas
from proxy.admin.console import CONTENT_SECURITY_POLICY
from proxy.errors import OpenAIError
from proxy.gateway.llm_api import ModelCard, ModelList
from proxy.openapi import undeclared

STATIC = REPO / "proxy" / "admin" / "static"
EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "50"))
SEED = int(os.environ.get("SCHEMATHESIS_SEED", "20261201"))
CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,"
    "response_schema_conformance"
)


async def get_document(proxy: Proxy) -> dict[str, Any]:
    async with proxy.session.get(proxy.url + "/openapi.json") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        document: dict[str, Any] = await response.json()
        return document


async def test_the_document_is_valid_openapi_3_1_and_declares_every_route(proxy: Proxy) -> None:
    document = await get_document(proxy)
    assert document["openapi"] == "3.1.0"
    validate(document)  # the OpenAPI 3.1 schema, JSON Schema 2020-12 inside
    assert undeclared(proxy.app) == []
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in proxy.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, item in document["paths"].items() for method in item}
    assert documented == served
    ids = [op["operationId"] for item in document["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))


async def test_admin_operations_are_documented_fully(proxy: Proxy) -> None:
    document = await get_document(proxy)
    components = document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, op in item.items():
            assert op["summary"] and op["tags"], (method, path)
            assert "security" in op, (method, path)
            for status, answer in op["responses"].items():
                for media, content in answer["content"].items():
                    assert "schema" in content, (method, path, status, media)
            if not path.startswith(("/api/v1/keys", "/api/v1/orgs", "/api/v1/llm/budgets")):
                continue
            # POST creates (201), except the quote, which only asks (200), and a rotation,
            # which changes a key that exists (200).
            created = method == "post" and not path.endswith(("/quote", "/rotate"))
            ok = op["responses"]["201" if created else "200"]
            ref = ok["content"]["application/json"]["schema"]["$ref"]
            assert ref.rsplit("/", 1)[1] in components
            for status in ("401", "500", "503"):
                error = op["responses"][status]["content"]["application/json"]["schema"]
                assert error == {"$ref": "#/components/schemas/OpenAIError"}
    # Request bodies are the very models the handlers validate with.
    put_budget = document["paths"]["/api/v1/llm/budgets/org/{orgId}"]["put"]
    body = put_budget["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/BudgetInput"}
    budget_input = components["BudgetInput"]
    assert set(budget_input["required"]) == {"period", "limit_kind", "limit", "thresholds"}
    assert budget_input["additionalProperties"] is False
    delete = document["paths"]["/api/v1/llm/budgets/org/{orgId}"]["delete"]
    (query,) = [p for p in delete["parameters"] if p["in"] == "query"]
    assert query["name"] == "owner" and query["schema"]["enum"] == ["cluster", "org"]
    messages = document["paths"]["/v1/messages"]["post"]["responses"]["401"]
    assert "AnthropicError" in json.dumps(messages)


async def test_the_document_reaches_its_own_viewer_unchanged(proxy: Proxy) -> None:
    """Served once built; a second fetch is the same document."""
    assert await get_document(proxy) == await get_document(proxy)


def check(model: type[BaseModel], body: Any) -> None:
    """What the document says: every required field present, nothing else (extra=forbid,
    strict); optional fields (those some scopes have) may be absent."""
    model.model_validate(body)
    dumped = model.model_validate(body).model_dump(mode="json", exclude_unset=True)
    required = {name for name, info in model.model_fields.items() if info.is_required()}
    assert required <= set(body) and set(dumped) == set(body), (model.__name__, body)


async def test_real_answers_match_the_documented_models(start_proxy: Any) -> None:
    failing = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=500)

    failing.router.add_post("/hook", refuse)
    receiver = TestServer(failing, host="127.0.0.1")
    await receiver.start_server()
    try:
        p: Proxy = await start_proxy(webhooks={"allow_private_targets": ["127.0.0.0/8"]})
        status, created = await p.admin(
            "POST", "/api/v1/keys", {"org_id": "acme", "name": "a", "limits": {"rpm": 5}}
        )
        assert status == 201
        check(schemas.ApiKeyCreated, created)
        kid = created["id"]
        check(schemas.ApiKeyList, (await p.admin("GET", "/api/v1/keys"))[1])
        check(schemas.ApiKey, (await p.admin("GET", f"/api/v1/keys/{kid}"))[1])
        check(schemas.ApiKey, (await p.admin("PATCH", f"/api/v1/keys/{kid}", {"name": "b"}))[1])
        check(schemas.Caller, (await p.admin("GET", "/api/v1/me"))[1])
        check(schemas.OrgLimits, (await p.admin("GET", "/api/v1/orgs/acme/limits"))[1])
        check(schemas.OrgLimits, (await p.admin("PUT", "/api/v1/orgs/acme/limits", {"rps": 9}))[1])
        spec = {
            "period": "daily",
            "limit_kind": "cost",
            "limit": 0.001,
            "thresholds": [{"pct": 1, "action": "alert"}],
            "webhook_url": str(receiver.make_url("/hook")),
        }
        check(schemas.Budget, (await p.admin("PUT", f"/api/v1/llm/budgets/apikey/{kid}", spec))[1])
        check(schemas.Budget, (await p.admin("PUT", "/api/v1/llm/budgets/org/acme", spec))[1])
        await p.openai(created["key"]).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
        check(schemas.BudgetList, (await p.admin("GET", "/api/v1/llm/budgets"))[1])
        check(schemas.BudgetList, (await p.admin("GET", "/api/v1/llm/budgets/org/acme"))[1])
        events = (await p.admin("GET", f"/api/v1/llm/budgets/apikey/{kid}/events"))[1]
        check(schemas.BudgetEventList, events)
        assert events["data"], "the alert threshold was crossed"
        for event in events["data"]:
            check(schemas.BudgetEvent, event)

        async def attempted() -> Any:
            _, answer = await p.admin("GET", "/api/v1/webhooks/deliveries")
            return [d for d in answer["data"] if d["attempts"]]

        await eventually(attempted, what="a delivery attempt")
        deliveries = (await p.admin("GET", "/api/v1/webhooks/deliveries"))[1]
        check(schemas.WebhookDeliveryList, deliveries)
        for delivery in deliveries["data"]:
            check(schemas.WebhookDelivery, delivery)
        deleted = await p.admin("DELETE", f"/api/v1/llm/budgets/apikey/{kid}?owner=org")
        check(schemas.BudgetDeleted, deleted[1])
        check(schemas.ApiKeyRevoked, (await p.admin("DELETE", f"/api/v1/keys/{kid}"))[1])
        check(ModelList, (await p.admin("GET", "/v1/models"))[1])
        check(ModelCard, (await p.admin("GET", "/v1/models/gpt-4o"))[1])
        check(schemas.Health, (await p.admin("GET", "/healthz"))[1])
        check(schemas.Readiness, (await p.admin("GET", "/readyz"))[1])
        for bad in ("/api/v1/keys/nope", "/api/v1/llm/budgets/org/acme?owner=x"):
            status, error = await p.admin("GET" if "keys" in bad else "DELETE", bad)
            assert status in (400, 404)
            check(OpenAIError, error)
    finally:
        await receiver.close()


# --- the console's pages -------------------------------------------------------------------


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.sources: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if "style" in names or any(name.startswith("on") for name in names):
            self.inline.append(f"<{tag} {sorted(names)}>")
        if tag == "style":
            self.inline.append("<style>")
        for name, value in attrs:
            if tag in ("script", "link", "img") and name in ("src", "href") and value:
                self.sources.append(value)
        self._in_script = tag == "script"

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append("inline <script>")


@pytest.mark.parametrize("page", ["ui", "docs"])
async def test_pages_have_no_inline_script_and_only_same_origin_assets(
    proxy: Proxy, page: str
) -> None:
    async with proxy.session.get(f"{proxy.url}/{page}") as response:
        assert response.status == 200
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"
        assert response.headers["X-Frame-Options"] == "DENY"
        html = await response.text()
    markup = _Markup()
    markup.feed(html)
    assert markup.inline == []
    for source in markup.sources:
        assert source.startswith("/"), source  # this origin only: no CDN
        async with proxy.session.get(proxy.url + source) as asset:
            assert asset.status == 200, source
            assert asset.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY


def test_console_scripts_never_write_markup() -> None:
    """Data reaches the DOM as text: no innerHTML, outerHTML, insertAdjacentHTML,
    document.write or eval in the console's own scripts."""
    forbidden = re.compile(
        r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function"
    )
    for script in (STATIC / "ui").glob("*.js"):
        assert not forbidden.search(script.read_text()), script
    assert not forbidden.search((STATIC / "docs" / "docs.js").read_text())


async def test_only_listed_assets_are_served(proxy: Proxy) -> None:
    for path in (
        "/ui/../app.py",
        "/ui/%2e%2e%2fapp.py",
        "/ui/nope.js",
        "/docs/swagger-ui-bundle.js.map",
        "/ui/index.html/",
    ):
        async with proxy.session.get(proxy.url + path) as response:
            assert response.status == 404, path
            check(OpenAIError, await response.json())


def test_static_files_are_package_data() -> None:
    """What the console serves ships in the wheel (pyproject's package-data)."""
    text = (REPO / "pyproject.toml").read_text()
    assert '"static/ui/*"' in text and '"static/docs/*"' in text


# --- schemathesis --------------------------------------------------------------------------


async def _seed(proxy_url: str, session: Any, receiver_url: str) -> dict[str, str]:
    """Objects for the run to find: a key, org and key budgets, an event, a delivery."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    async def call(method: str, path: str, body: Any = None, key: str | None = None) -> Any:
        auth = {"Authorization": f"Bearer {key}"} if key else headers
        async with session.request(method, proxy_url + path, json=body, headers=auth) as answer:
            assert answer.status < 300, (path, answer.status, await answer.text())
            return await answer.json()

    member = await call("POST", "/api/v1/keys", {"org_id": "acme", "name": "fuzz-member"})
    await call("POST", "/api/v1/keys", {"org_id": "acme", "name": "ops", "role": "org_admin"})
    spec = {
        "period": "monthly",
        "limit_kind": "tokens",
        "limit": 100000,
        "thresholds": [{"pct": 1, "action": "alert"}, {"pct": 100, "action": "block"}],
        "webhook_url": receiver_url,
    }
    await call("PUT", f"/api/v1/llm/budgets/apikey/{member['id']}", spec)
    await call("PUT", "/api/v1/llm/budgets/org/acme", {**spec, "owner": "cluster"})
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    await call("POST", "/v1/chat/completions", {**chat, "max_tokens": 900}, key=member["key"])
    return {"org": "acme", "key": member["id"]}


def _with_examples(document: dict[str, Any], seeded: dict[str, str]) -> dict[str, Any]:
    """Points the path parameters at objects that exist, and gives the LLM routes a body that
    passes admission: the examples phase then reaches real budgets, keys, events, answers."""
    values = {
        "orgId": seeded["org"],
        "keyId": seeded["key"],
        "apiKeyId": seeded["key"],
        "model": "gpt-4o-mini",
    }
    bodies = {
        "/chat/completions": {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
        },
        "/completions": {"model": "gpt-4o-mini", "prompt": "hi", "max_tokens": 5},
        "/responses": {"model": "gpt-4o-mini", "input": "hi", "max_output_tokens": 16},
        "/embeddings": {"model": "text-embedding-3-small", "input": "hi"},
    }
    for path, item in document["paths"].items():
        for op in item.values():
            for parameter in op.get("parameters", []):
                if parameter["in"] == "path" and parameter["name"] in values:
                    parameter["example"] = values[parameter["name"]]
                elif parameter["in"] == "path" and parameter["name"] == "asset":
                    parameter["example"] = "console.js" if path.startswith("/ui") else "docs.js"
                elif parameter["name"] == "org_id":
                    parameter["example"] = seeded["org"]
            content = op.get("requestBody", {}).get("content", {}).get("application/json")
            for suffix, body in bodies.items():
                if content is not None and path.endswith(suffix):
                    content["example"] = body
    return document


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_schemathesis_finds_no_server_error_and_no_undocumented_answer(
    tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> None:
    failing = web.Application()

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    failing.router.add_post("/hook", refuse)
    receiver = TestServer(failing, host="127.0.0.1")
    await receiver.start_server()
    tail = "\n".join(
        [
            "[[models]]",
            'name = "gpt-4o"',
            'upstream = "mock"',
            "[[models]]",
            'name = "text-embedding-3-small"',
            'upstream = "mock"',
            'kind = "embedding"',
            'encoding = "cl100k_base"',
        ]
    )
    config = write_config(
        tmp_path / "proxy.toml",
        str(mock_upstream.make_url("/v1")),
        redis_url,
        tail=tail,
        webhooks='allow_private_targets = ["127.0.0.0/8"]',
    )
    running = await start_proxy_process(config, tmp_path / "proxy.log")
    try:
        async with aiohttp.ClientSession() as session:
            seeded = await _seed(running.url, session, str(receiver.make_url("/hook")))
            async with session.get(running.url + "/openapi.json") as answer:
                document = await answer.json()
        validate(document)
        schema = tmp_path / "openapi.json"
        schema.write_text(json.dumps(_with_examples(document, seeded)))
        report = tmp_path / "schemathesis.junit.xml"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            str(schema),
            "--url",
            running.url,
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--header",
            f"Authorization: Bearer {ADMIN_KEY}",
            "--max-examples",
            str(EXAMPLES),
            "--seed",
            str(SEED),
            # One worker: hypothesis parses lambda sources with ast, which is not thread-safe
            # on CPython 3.11 ("AST constructor recursion depth mismatch").
            "--workers",
            "1",
            "--request-timeout",
            "20",
            "--generation-database",
            "none",
            "--no-color",
            "--report",
            "junit",
            "--report-junit-path",
            str(report),
            cwd=str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(process.communicate(), timeout=540)
        text = output.decode(errors="replace")
        print(text[-6000:])
        assert process.returncode == 0, text[-12000:]
        assert re.search(r"Tested: (\d+)", text), text[-3000:]
        tested = int(re.search(r"Tested: (\d+)", text).group(1))  # type: ignore[union-attr]
        assert tested == sum(len(item) for item in document["paths"].values())
        answered = [
            json.loads(line)
            for line in (tmp_path / "proxy.log").read_text().splitlines()
            if line.startswith("{")
        ]
        assert answered and not [a for a in answered if a.get("status", 0) >= 500]
        # The examples reached real objects, not only 404s.
        reached = {(a["method"], a["path"], a["status"]) for a in answered if "path" in a}
        key_budgets = f"/api/v1/llm/budgets/apikey/{seeded['key']}"
        for wanted in (
            ("GET", "/api/v1/llm/budgets/org/acme", 200),
            ("PUT", key_budgets, 200),
            ("GET", key_budgets + "/events", 200),
            ("POST", "/v1/chat/completions", 200),
            ("POST", "/v1/embeddings", 200),
        ):
            assert wanted in reached, wanted
    finally:
        running.stop()
        await receiver.close()
