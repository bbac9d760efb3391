"""Requests a hostile client would send, generated from a seed: bodies, headers, paths and ids
for every endpoint of the proxy, and bytes below HTTP. Used by ``test_hostile_input.py``.

Every probe is data (method, path, headers, body bytes, or raw bytes for the socket), so a
failing run is reproduced exactly from its seed and the probe's index.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from typing import Any

import hostile_google

LLM_ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses")
PREFIXES = ("/v1", "/api/v1/llm")
CHAT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4o-latest")
EMBEDDING_MODEL = "text-embedding-3-small"
# Statuses the mock may be told to answer with: upstream errors relayed as they are. Never
# 500, so that any 500 the client sees is the proxy's own.
MOCK_STATUSES = (400, 401, 404, 409, 422, 429, 502, 503)
WORDS = ("budget", "quokka", "ledger", "token", "stream", "naïve", "数据", "🔑", "x" * 40)


@dataclass
class Keys:
    """The keys the fuzzer uses: ``name -> plaintext`` and ``name -> key id``."""

    plaintext: dict[str, str]
    ids: dict[str, str]
    admin: str

    def all_secrets(self) -> list[str]:
        return [self.admin, *self.plaintext.values()]


@dataclass
class Probe:
    index: int
    method: str
    path: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    raw: bytes | None = None
    """Sent as is on a fresh socket instead of an HTTP request (parser faults)."""
    llm: bool = False
    mock_status: int | None = None
    creates_key: bool = False
    note: str = ""

    def describe(self) -> str:
        body = (self.raw or self.body or b"")[:300]
        return f"#{self.index} {self.method} {self.path[:120]} {self.note} {body!r}"


def _text(rng: random.Random, words: int = 4) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(words, 1)))


def _junk_string(rng: random.Random) -> str:
    choice = rng.randrange(7)
    if choice == 0:
        return ""
    if choice == 1:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 40)))
    if choice == 2:
        return "\u0000\u0001\u001f\u007f"
    if choice == 3:
        return "a" * rng.choice((1, 300, 5000))
    if choice == 4:
        return "../" * 5 + "etc/passwd"
    if choice == 5:
        return "🔑" * rng.randrange(1, 30)
    return _text(rng, rng.randrange(1, 8))


def _junk_value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(10 if depth < 3 else 7)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice((True, False))
    if choice == 2:
        return rng.choice((0, -1, 1, 7, 2**31, 2**53 + 1, 10**12))
    if choice == 3:
        return rng.choice((0.5, -0.0, 1e-300, 3.5, 1e300))
    if choice in (4, 5, 6):
        return _junk_string(rng)
    if choice in (7, 8):
        return [_junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {_junk_string(rng)[:20]: _junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _int_or_junk(rng: random.Random, low: int, high: int) -> Any:
    """A positive integer usually; sometimes exactly what a parser must refuse, or a cap no
    ledger could record (10**13 and up: 400 naming the param, nothing consumed)."""
    if rng.random() < 0.8:
        return rng.randint(low, high)
    return rng.choice(
        (0, -3, 1.5, "12", True, None, [], {"n": 1}, 10**6, 10**13, 2**53 + 1, 10**400)
    )


class Generator:
    """Hostile probes for one proxy, from one seed."""

    def __init__(self, seed: int, keys: Keys, key_ids: list[str], orgs: list[str]) -> None:
        self.rng = random.Random(seed)
        self.keys = keys
        self.key_ids = key_ids  # ids that exist (some in other orgs)
        self.orgs = orgs
        self.count = 0

    def probes(self, n: int) -> list[Probe]:
        kinds = (
            (self.llm, 50),
            (self.gemini, 12),
            (self.admin_keys, 10),
            (self.org_limits, 5),
            (self.budgets, 10),
            (self.misc, 12),
            (self.raw, 8),
            (self.webhooks, 5),
        )
        makers = [maker for maker, weight in kinds for _ in range(weight)]
        return [self.rng.choice(makers)() for _ in range(n)]

    def _probe(self, method: str, path: str, **fields: Any) -> Probe:
        self.count += 1
        return Probe(self.count, method, path, **fields)

    # -- who is asking ---------------------------------------------------------------------

    def _auth(self, llm: bool) -> list[tuple[str, str]]:
        rng, keys = self.rng, self.keys
        roll = rng.random()
        if roll < 0.05:
            return []
        if roll < 0.08:
            return [("Authorization", "Basic " + keys.plaintext["member"])]
        if roll < 0.11:
            return [("Authorization", "Bearer sk-bp-" + "".join(rng.choices("abc123", k=43)))]
        if roll < 0.13:
            return [("Authorization", "Bearer " + keys.plaintext["revoked"])]
        if roll < 0.15:
            return [("Authorization", "Bearer")]
        names = ["member", "limited", "restricted", "other_org"] if llm else []
        names += ["org_admin", "member", "admin", "admin"]
        name = rng.choice(names)
        token = keys.admin if name == "admin" else keys.plaintext[name]
        return [("Authorization", f"Bearer {token}")]

    def _extra_headers(self) -> list[tuple[str, str]]:
        rng, secret = self.rng, self.keys.plaintext["member"]
        headers: list[tuple[str, str]] = []
        if rng.random() < 0.2:
            headers.append(("X-On-Behalf-Of", rng.choice(("user-1", "u" * 300, "", "ok user"))))
        if rng.random() < 0.2:
            headers.append(("x-request-id", rng.choice(("trace-1", "r" * 200, "", "é"))))
        if rng.random() < 0.15:
            name = rng.choice(("x-api-key", "anthropic-api-key", "x-goog-api-key", "api-key"))
            headers.append((name, secret))  # must never reach the upstream
        if rng.random() < 0.1:
            headers.append(("OpenAI-Organization", "org-client"))
        if rng.random() < 0.1:
            headers.append(("Content-Type", rng.choice(("text/plain", "application/xml", ""))))
        return headers

    # -- LLM endpoints -----------------------------------------------------------------------

    def llm(self) -> Probe:
        rng = self.rng
        endpoint = rng.choice(LLM_ENDPOINTS)
        path = rng.choice(PREFIXES) + "/" + endpoint
        body, raw_body, note = self._llm_body(endpoint)
        headers = self._auth(llm=True) + self._extra_headers()
        mock_status = None
        if rng.random() < 0.3:
            headers.append(("x-mock-output-tokens", str(rng.randint(0, 40))))
        if rng.random() < 0.05:
            mock_status = rng.choice(MOCK_STATUSES)
            headers.append(("x-mock-status", str(mock_status)))
        if rng.random() < 0.05:
            headers.append(("x-mock-latency-ms", str(rng.randint(1, 30))))
        data = raw_body if raw_body is not None else json.dumps(body).encode()
        return self._probe(
            "POST", path, headers=headers, body=data, llm=True, mock_status=mock_status, note=note
        )

    def gemini(self) -> Probe:
        return hostile_google.probe(self)

    def _llm_body(self, endpoint: str) -> tuple[dict[str, Any], bytes | None, str]:
        rng = self.rng
        if endpoint == "embeddings":
            # Empty inputs included: a request reserving nothing must settle like any other.
            value: Any = rng.choice(
                (
                    "",
                    [""],
                    _text(rng, rng.randint(1, 20)),
                    [_text(rng, 2) for _ in range(rng.randint(1, 4))],
                    [rng.randint(0, 50_000) for _ in range(rng.randint(1, 8))],
                )
            )
            body: dict[str, Any] = {"model": EMBEDDING_MODEL, "input": value}
            if rng.random() < 0.2:
                body["dimensions"] = _int_or_junk(rng, 1, 16)
            if rng.random() < 0.2:
                body["encoding_format"] = rng.choice(("float", "base64", 7))
        else:
            body = {"model": rng.choice(CHAT_MODELS)}
            if endpoint == "chat/completions":
                body["messages"] = [
                    {"role": rng.choice(("user", "system", "assistant")), "content": _text(rng)}
                    for _ in range(rng.randint(1, 4))
                ]
            elif endpoint == "completions":
                body["prompt"] = _text(rng, rng.randint(1, 30))
            else:
                body["input"] = _text(rng, rng.randint(1, 30))
            cap = {"responses": "max_output_tokens", "completions": "max_tokens"}.get(
                endpoint, rng.choice(("max_tokens", "max_completion_tokens"))
            )
            if rng.random() < 0.7:
                body[cap] = _int_or_junk(rng, 1, 64)
            if endpoint != "responses" and rng.random() < 0.15:
                body["n"] = _int_or_junk(rng, 1, 3)
            if endpoint == "completions" and rng.random() < 0.1:
                body["best_of"] = _int_or_junk(rng, 1, 3)
            if rng.random() < 0.3:
                body["stream"] = rng.choice((True, True, False, "yes", 1, None))
                if endpoint != "responses" and rng.random() < 0.5:
                    body["stream_options"] = rng.choice(
                        ({"include_usage": True}, {"include_usage": False}, "on", [], None)
                    )
        note = ""
        roll = rng.random()
        if roll < 0.35:
            for _ in range(rng.randint(1, 3)):
                note += self._mutate(endpoint, body)
        raw_body = None
        if rng.random() < 0.12:
            raw_body, note = self._raw_body(body)
        return body, raw_body, note

    def _mutate(self, endpoint: str, body: dict[str, Any]) -> str:
        rng = self.rng
        roll = rng.randrange(9)
        if roll == 0:
            body["model"] = rng.choice(
                ("gpt-9", "", 7, None, ["gpt-4o"], {"id": "gpt-4o"}, "gpt-4o" * 100, "GPT-4O")
            )
            return " model"
        if roll == 1 and endpoint != "embeddings":
            body["model"] = EMBEDDING_MODEL  # a model of the wrong kind
            return " kind"
        if roll == 1:
            body["model"] = rng.choice(CHAT_MODELS)
            return " kind"
        if roll == 2:
            name = rng.choice(("messages", "prompt", "input", "tools", "functions", "metadata"))
            if endpoint == "embeddings" and name == "input":
                return ""
            body[name] = _junk_value(rng)
            return f" junk {name}"
        if roll == 3:
            for name in ("messages", "prompt"):
                if name in body:
                    del body[name]
                    return f" no {name}"
            return ""
        if roll == 4:
            body["temperature"] = _junk_value(rng)
            return " temperature"
        if roll == 5:
            body["user"] = _junk_string(rng)
            return " user"
        if roll == 6 and endpoint == "chat/completions":
            body["tools"] = [
                {
                    "type": "function",
                    "function": {"name": _junk_string(rng)[:30], "parameters": _junk_value(rng)},
                }
            ]
            return " tools"
        if roll == 7 and endpoint == "chat/completions":
            body["messages"] = [
                {"role": _junk_value(rng), "content": _junk_value(rng)}
                for _ in range(rng.randint(0, 3))
            ]
            return " messages"
        body[_junk_string(rng)[:30] or "x"] = _junk_value(rng)
        return " extra field"

    def _raw_body(self, body: dict[str, Any]) -> tuple[bytes, str]:
        rng = self.rng
        encoded = json.dumps(body)
        roll = rng.randrange(9)
        if roll == 0:
            return encoded[: rng.randrange(len(encoded))].encode(), " truncated"
        if roll == 1:
            return b"", " empty"
        if roll == 2:
            return json.dumps([body]).encode(), " array"
        if roll == 3:
            depth = rng.choice((129, 1000, 100_000))
            return b"[" * depth + b"]" * depth, f" nested {depth}"
        if roll == 4:
            key = rng.choice(("max_tokens", "model", "messages", "stream"))
            return (encoded[:-1] + f', "{key}": 1}}').encode(), f" duplicate {key}"
        if roll == 5:
            return encoded.encode("utf-16"), " utf-16"
        if roll == 6:
            return encoded.encode() + b"\xff\xfe", " trailing bytes"
        if roll == 7:
            return b"\xef\xbb\xbf" + encoded.encode(), " bom"
        return encoded.replace("}", ', "x": NaN}', 1).encode(), " NaN"

    # -- admin APIs --------------------------------------------------------------------------

    def _id(self, existing: list[str]) -> str:
        rng = self.rng
        if existing and rng.random() < 0.6:
            return rng.choice(existing)
        return rng.choice(
            ("key_0000000000000000", "..%2F..%2Fx", "a%0Ab", "x" * 300, "%F0%9F%94%91", "-", "_")
        )

    def _limits(self) -> dict[str, Any]:
        rng = self.rng
        names = ("rps", "rpm", "rph", "rpd", "tpm", "concurrency", "burst")
        return {
            rng.choice(names): rng.choice(
                (1, 100, 10**6, 10**12, 10**13, 2**53 + 1, 0, -1, "5", None)
            )
            for _ in range(rng.randint(0, 3))
        }

    def admin_keys(self) -> Probe:
        rng = self.rng
        headers = self._auth(llm=False)
        roll = rng.randrange(5)
        if roll == 0:
            spec: dict[str, Any] = {
                "org_id": rng.choice([*self.orgs, "fz-keys", _junk_string(rng)])
            }
            if rng.random() < 0.5:
                spec["role"] = rng.choice(("member", "org_admin", "cluster_admin", "root", 3))
            if rng.random() < 0.4:
                spec["models"] = rng.choice(
                    (["gpt-4o"], ["gpt-4o-latest", "gpt-4o-latest"], ["nope"], [], None, "gpt-4o")
                )
            if rng.random() < 0.4:
                spec["limits"] = self._limits()
            if rng.random() < 0.2:
                spec["name"] = _junk_string(rng)
            return self._probe(
                "POST", "/api/v1/keys", headers=headers, body=json.dumps(spec).encode(),
                creates_key=True,
            )  # fmt: skip
        if roll == 1:
            query = rng.choice(("", "?org_id=" + self._id(self.orgs), "?org_id="))
            return self._probe("GET", "/api/v1/keys" + query, headers=headers)
        key_id = self._id(self.key_ids)
        if roll == 2:
            return self._probe("GET", f"/api/v1/keys/{key_id}", headers=headers)
        if roll == 3:
            change = rng.choice(
                (
                    {"name": _junk_string(rng)},
                    {"limits": self._limits()},
                    {"models": rng.choice((["gpt-4o"], ["nope"], None))},
                    {"role": rng.choice(("member", "cluster_admin", "x"))},
                    {"colour": "red"},
                )
            )
            return self._probe(
                "PATCH", f"/api/v1/keys/{key_id}", headers=headers, body=json.dumps(change).encode()
            )
        return self._probe("DELETE", f"/api/v1/keys/{key_id}", headers=headers)

    def org_limits(self) -> Probe:
        rng = self.rng
        org = rng.choice(("fz-org", "fz-org-2", *self._bad_ids()))
        headers = self._auth(llm=False)
        if rng.random() < 0.5:
            return self._probe("GET", f"/api/v1/orgs/{org}/limits", headers=headers)
        body = json.dumps(self._limits()).encode()
        return self._probe("PUT", f"/api/v1/orgs/{org}/limits", headers=headers, body=body)

    def _bad_ids(self) -> tuple[str, ...]:
        return ("..%2Fx", "a%0Ab", "x" * 5000, "%F0%9F%94%91", "a%20b")

    def budgets(self) -> Probe:
        rng = self.rng
        headers = self._auth(llm=False)
        base = "/api/v1/llm/budgets"
        if rng.random() < 0.1:
            return self._probe("GET", base, headers=headers)
        if rng.random() < 0.5:
            path = f"{base}/apikey/{self._id(self.key_ids)}"
        else:
            path = f"{base}/org/{rng.choice((*self.orgs, 'fz-org', *self._bad_ids()))}"
        roll = rng.randrange(4)
        if roll == 0:
            return self._probe(
                "GET", path + rng.choice(("", "/events", "/events?limit=0")), headers=headers
            )
        if roll == 1:
            owner = rng.choice(("org", "cluster", "admin", ""))
            return self._probe("DELETE", f"{path}?owner={owner}", headers=headers)
        body: dict[str, Any] = {
            "period": rng.choice(("daily", "weekly", "monthly", "hourly")),
            "limit_kind": rng.choice(("cost", "tokens", "requests")),
            "limit": rng.choice(
                (1000, 50, 0.5, 10**9, 9_007_199, 2**53, 10**400, 0, -1, "10", None, 1e300)
            ),
            "thresholds": rng.choice(
                (
                    [{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}],
                    [{"pct": 793338, "action": "alert"}],
                    [{"pct": 10**9 + 1, "action": "block"}],
                    [{"pct": 0, "action": "alert"}],
                    [],
                    "all",
                )
            ),
        }
        if rng.random() < 0.3:
            body["webhook_url"] = rng.choice(
                (
                    "http://127.0.0.1:9/hook",
                    "http://[2002:7f00:1::]/hook",
                    "http://169.254.169.254/latest",
                    "ftp://example.com/x",
                    "not a url",
                )
            )
            body["webhook_secret"] = rng.choice(("s3cret", "", None, 7))
        if rng.random() < 0.2:
            body["owner"] = rng.choice(("org", "cluster", "nobody"))
        raw = json.dumps(body).encode() if rng.random() < 0.9 else b'{"limit": 1, "limit": 2}'
        return self._probe("PUT", path, headers=headers, body=raw)

    def webhooks(self) -> Probe:
        rng = self.rng
        query = rng.choice(
            (
                "",
                "?status=pending",
                "?status=lost",
                "?limit=0",
                "?limit=1001",
                "?limit=abc",
                "?org_id=" + rng.choice((*self.orgs, "..%2Fx", "x" * 100)),
            )
        )
        return self._probe("GET", "/api/v1/webhooks/deliveries" + query, headers=self._auth(False))

    # -- everything else -------------------------------------------------------------------------

    def misc(self) -> Probe:
        rng = self.rng
        headers = self._auth(llm=True)
        roll = rng.randrange(8)
        if roll == 0:
            return self._probe("GET", rng.choice(("/healthz", "/readyz")))
        if roll == 1:
            return self._probe("GET", "/metrics", headers=rng.choice(([], headers)))
        if roll == 2:
            return self._probe("GET", rng.choice(PREFIXES) + "/models", headers=headers)
        if roll == 3:
            model = rng.choice((*CHAT_MODELS, EMBEDDING_MODEL, "nope", "a/b/c", "%00", "x" * 500))
            return self._probe("GET", f"{rng.choice(PREFIXES)}/models/{model}", headers=headers)
        if roll == 4:
            path = rng.choice(("/", "/v1", "/v1/chat", "/v2/chat/completions", "/admin", "/%2e%2e"))
            return self._probe(rng.choice(("GET", "POST", "DELETE")), path, headers=headers)
        if roll == 5:
            path = rng.choice(PREFIXES) + "/" + rng.choice(LLM_ENDPOINTS)
            return self._probe(rng.choice(("GET", "PUT", "DELETE", "PATCH")), path, headers=headers)
        if roll == 6:
            return self._probe(
                "POST", "/v1/chat/completions", headers=headers, body=b"x" * 300_000, note=" 413"
            )
        return self._probe("OPTIONS", rng.choice(("/v1/models", "/api/v1/keys")), headers=headers)

    def raw(self) -> Probe:
        rng = self.rng
        key = self.keys.plaintext["member"]
        auth = f"Authorization: Bearer {key}".encode()
        cases = (
            b"GET /healthz HTTP/1.1\r\nHost: p\r\n"
            + b"".join(b"X-H%d: 1\r\n" % i for i in range(rng.randint(129, 300)))
            + b"\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: p\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n" + auth
            + b"\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET /v1/mod\xffels HTTP/1.1\r\nHost: p\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: p\r\n" + auth
            + rng.choice((b"\x01", b"\x00", b"\x7f")) + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: p\r\n" + auth + b"\r\n  folded\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: p\r\nAuthorization: Bearer sk-\xff\xfe\x80\r\n"
            b"Connection: close\r\n\r\n",
            bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))) + b"\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
            b"GET /healthz HTTP/9.9\r\nHost: p\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: -5\r\n\r\n",
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n"
            b"Content-Length: 6\r\n\r\nabcdef",
        )  # fmt: skip
        index = rng.randrange(len(cases))
        return self._probe("RAW", "-", raw=cases[index], note=f" raw case {index}")
