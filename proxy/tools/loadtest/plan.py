"""What a run sends: its limits, the keys, and the request bodies built once per run (so
the client stays cheap beside what it measures)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from proxy.tools.mock import WORDS

MAX_DURATION_S = 3600.0
"""Longest run, also the time cap of a ``--requests`` run: the tool must stop by itself."""
MAX_REQUESTS = 1_000_000
MAX_CONCURRENCY = 2048
MAX_CREATED_KEYS = 1000
MAX_PROMPT_TOKENS = 500_000
MAX_RATE = 100_000.0
LATE_START_S = 0.001
"""A fixed-rate request sent later than this after its scheduled time counts as a late start."""
WAKE_EARLY_S = 0.001
"""Event-loop timers are only as fine as a millisecond (epoll rounds the wait up, uvloop to the
nearest ms): waking this much early keeps timer noise out of the late starts."""
CHAT_PATH = "/v1/chat/completions"
MESSAGES_PATH = "/v1/messages"
Api = Literal["openai", "anthropic"]
ADMIN_KEY_ENV = "PROXY_ADMIN_KEY"
_CHAT_FRAMING_TOKENS = 7
"""One user message costs its text + 4 framing tokens + 3 reply-priming tokens."""


class LoadtestError(Exception):
    """A setup problem the user must fix; reported in one line, exit status 2."""


@dataclass(frozen=True)
class LoadKey:
    secret: str
    key_id: str | None = None


@dataclass(frozen=True)
class Plan:
    """What to send, how hard and for how long."""

    url: str
    keys: tuple[LoadKey, ...]
    concurrency: int = 16
    duration: float | None = 10.0
    requests: int | None = None
    stream_ratio: float = 0.0
    model: str = "gpt-4o-mini"
    max_tokens: int = 16
    prompt: str = ""
    timeout: float = 60.0
    rate: float | None = None
    """Requests per second on a fixed schedule (open loop); None: closed loop."""
    api: Api = "openai"
    """``anthropic``: POST /v1/messages with the key as ``x-api-key``."""

    def __post_init__(self) -> None:
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise LoadtestError(f"--concurrency must be 1..{MAX_CONCURRENCY}")
        if (self.duration is None) == (self.requests is None):
            raise LoadtestError("give exactly one of --duration and --requests")
        if self.duration is not None and not 0 < self.duration <= MAX_DURATION_S:
            raise LoadtestError(f"--duration must be in (0, {MAX_DURATION_S:g}] seconds")
        if self.requests is not None and not 1 <= self.requests <= MAX_REQUESTS:
            raise LoadtestError(f"--requests must be 1..{MAX_REQUESTS}")
        if not 0.0 <= self.stream_ratio <= 1.0:
            raise LoadtestError("--stream-ratio must be between 0 and 1")
        if self.max_tokens < 1:
            raise LoadtestError("--max-tokens must be positive")
        if self.timeout <= 0:
            raise LoadtestError("--timeout must be positive")
        if self.rate is not None:
            # Written so that NaN fails too.
            if not 0 < self.rate <= MAX_RATE:
                raise LoadtestError(f"--rate must be in (0, {MAX_RATE:g}] requests per second")
            if self.requests is not None and (self.requests - 1) / self.rate >= MAX_DURATION_S:
                raise LoadtestError(
                    f"--requests {self.requests} at --rate {self.rate:g} would take longer "
                    f"than the {MAX_DURATION_S:g} s a run may last"
                )

    def body(self, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": self.max_tokens,
        }
        if stream:
            body["stream"] = True
            if self.api == "openai":
                # Without it the proxy keeps the usage chunk to itself: nothing to reconcile.
                body["stream_options"] = {"include_usage": True}
        return json.dumps(body, separators=(",", ":")).encode()

    @property
    def path(self) -> str:
        return MESSAGES_PATH if self.api == "anthropic" else CHAT_PATH

    def headers(self, key: LoadKey) -> dict[str, str]:
        if self.api == "anthropic":
            return {
                "x-api-key": key.secret,
                "anthropic-version": "2023-06-01",
                "Content-Type": "application/json",
            }
        return {"Authorization": f"Bearer {key.secret}", "Content-Type": "application/json"}

    def streamed(self, n: int) -> bool:
        """Request n is streamed: spreads exactly round(ratio * count) streams evenly."""
        r = self.stream_ratio
        return math.floor((n + 1) * r) > math.floor(n * r)


def synthetic_prompt(tokens: int) -> str:
    """Text of one-token words sized so the whole chat prompt is ~``tokens`` tokens."""
    words = max(tokens - _CHAT_FRAMING_TOKENS, 1)
    laps, rest = divmod(words, len(WORDS))
    return ("".join(WORDS) * laps + "".join(WORDS[:rest])).lstrip()
