"""The benchmark: what the proxy costs on top of a bare pass-through, measured in one run.

    python tests/bench/run_bench.py [--duration 10] [--connections 64] [--json out.json]
                                    [--scenario short|long|both] [--memory-minutes N]
                                    [--rounds N] [--paced-fraction 0.5] [--profile DIR] [--pin]
                                    [--cluster-orgs 24]
                                    [--end-users N]

It starts Redis (embedded), the mock upstream (own process, uvloop, 0 ms latency), a bare
aiohttp pass-through (``passthrough.py``) and the real proxy (``python -m proxy serve --workers
1`` with auth, key and org rate limits and budgets, so every check runs), then puts the same
load on (a) the mock directly, (b) the pass-through and (c) the proxy: a warm-up, then the
measured run. The load generator is ``wrk`` (installed by ``scripts/install-wrk.sh`` if
missing, when possible), else the proxy's own ``llm-proxy loadtest``; the report says which.

``--rounds N`` repeats (a), (b), (c) N times and reports the round with the median (c)/(b)
ratio, with every round's ratio: single runs on a shared machine move by ±0.05.

Then (b) and (c) run again at the same paced load, ``--paced-fraction`` (default half) of the
rate (c) reached: at saturation a closed loop's latency is mostly queueing, so the added latency
the proxy itself causes is read at a load both carry (each ``wrk`` connection waits an
exponentially distributed gap after every answer; the Python generator uses a fixed schedule).

The same run also measures (c) on a three-shard Redis Cluster (three masters, one replica each,
started by the test harness, ``tests/redis_topologies.py``), twice: with ``durability =
"async"`` and with ``"replicated"`` (a ``WAIT`` per batch), the load spread round-robin over one
key in each of ``--cluster-orgs`` orgs (and so over the shards). For these rows it reports the
Redis CPU of every shard: its share of the calls, its master's CPU per request of the run and
per request it served, and its replica's CPU per request (replication's cost).

Scenarios: ``short`` chat prompts and ``long`` prompts of ~50k tokens (counting them must not
stall the proxy's event loop: a /healthz probe runs beside the load and its latency shows
stalls). Per target: req/s, latency p50/p90/p99/max, CPU per request of each process; for (c)
also Redis commands per request from ``INFO commandstats``. ``--memory-minutes N`` instead
samples the proxy's RSS under steady load and reports growth after warm-up. ``--profile DIR``
adds an unmeasured run of (b) and (c) under py-spy and prints where their CPU goes
(``cpu_profile.py``); ``--pin`` puts the server under test alone on one core, for A/B
comparisons of two versions (the headline figures are unpinned). ``--end-users N`` sends every
request on behalf of one of N end users (``X-On-Behalf-Of``, round robin) and gives the org a
default budget and rate limits for each end user, so the end-user checks run too (wrk only).

Everything runs on this machine, so the generator, the mock, Redis and the system under test
share its cores: compare targets within one run, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis
from redis import Redis

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import cpu_profile as bench_profile  # noqa: E402  (beside this file)
from redis_topologies import RedisClusterTopology, running  # noqa: E402  (the test harness)

from proxy.catalog.tokenizer import count_chat_prompt, get_encoding  # noqa: E402
from proxy.store.embedded_redis import EmbeddedRedis, free_port  # noqa: E402
from proxy.tools.loadtest import percentiles  # noqa: E402

ADMIN_KEY = "sk-bench-admin-0123456789abcdef"
ORG = "bench"
MODEL = "gpt-4o-mini"
MAX_TOKENS = 16
CHAT_PATH = "/v1/chat/completions"
HUGE = 10**12
SHORT_PROMPT = (
    "You are a concise assistant. Summarise in one sentence why rate limiting matters for a "
    "shared API gateway, and name one common algorithm for it."
)
_VOCABULARY = (
    "the of and to in is it that for on with as was at by be this from are or an not have but "
    "they we you all one can had more system request budget token model latency proxy upstream "
    "answer question data value number table report window minute hour limit spend cost price "
    "user client server process memory thread event loop stream chunk buffer network packet "
    "between through during before after under above across against among around because "
    "however therefore although meanwhile moreover otherwise instead likewise perhaps usually "
    "quickly slowly carefully exactly roughly nearly almost always never often sometimes "
    "analysis summary detail example context document paragraph sentence word letter symbol"
).split()


# --- workloads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    prompt: str
    prompt_tokens: int

    def body(self, stream: bool) -> bytes:
        body: dict[str, Any] = {
            "model": MODEL,
            "messages": [{"role": "user", "content": self.prompt}],
            "max_tokens": MAX_TOKENS,
        }
        if stream:
            body["stream"] = True
        return json.dumps(body, separators=(",", ":")).encode()


def _chat_tokens(text: str) -> int:
    return count_chat_prompt(
        get_encoding("o200k_base"), {"messages": [{"role": "user", "content": text}]}
    )


def long_prompt(tokens: int) -> str:
    """Varied English-like text (not one repeated word, which tokenizers handle atypically)."""
    rng = random.Random(20261125)
    words: list[str] = []
    while len(words) < tokens:
        sentence = [rng.choice(_VOCABULARY) for _ in range(rng.randint(6, 18))]
        words.extend([sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + "."])
    text = " ".join(words)
    # Trim to the target: tokens per character is stable over such text.
    actual = _chat_tokens(text)
    text = text[: int(len(text) * tokens / actual)]
    return text


def scenarios(which: str, long_tokens: int) -> list[Scenario]:
    chosen = []
    if which in ("short", "both"):
        chosen.append(Scenario("short", SHORT_PROMPT, _chat_tokens(SHORT_PROMPT)))
    if which in ("long", "both"):
        text = long_prompt(long_tokens)
        chosen.append(Scenario("long", text, _chat_tokens(text)))
    return chosen


# --- processes --------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_ADMIN_KEY": ADMIN_KEY}
    env.pop("PROXY_CONFIG", None)
    return env


def proxy_config(
    path: Path, upstream: str, redis_url: str, durability: str = "async", batch: bool = True
) -> Path:
    path.write_text(
        "\n".join(
            [
                "[server]",
                'host = "127.0.0.1"',
                "uvloop = true",
                "shutdown_grace_seconds = 5",
                "[redis]",
                f'url = "{redis_url}"',
                f'durability = "{durability}"',
                "[limits]",
                f"batch_settles = {'true' if batch else 'false'}",
                "[auth]",
                'bootstrap_key_env = "BENCH_ADMIN_KEY"',
                "[[upstreams]]",
                'name = "mock"',
                f'base_url = "{upstream}/v1"',
                "[[models]]",
                f'name = "{MODEL}"',
                'upstream = "mock"',
                "max_output_tokens = 1000",
                "",
            ]
        )
    )
    return path


@dataclass
class Target:
    label: str
    name: str
    url: str
    process: subprocess.Popen[bytes]
    probe_path: str
    log: Path
    keys: list[str] = field(default_factory=list)
    """The LLM keys the load spreads over (a proxy target); the mock and pass-through take any."""
    redis: dict[str, int] = field(default_factory=dict)
    """Name → pid of every Redis process behind a proxy target (masters and replicas)."""
    redis_stats: dict[str, Redis] = field(default_factory=dict)
    """Name → client of each master whose command statistics count this target's calls."""

    @property
    def is_proxy(self) -> bool:
        return bool(self.redis)


def _tail(log: Path) -> str:
    """A failed process's last words (the work directory is deleted on the way out)."""
    return log.read_text(errors="replace")[-3000:]


async def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as session:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{url} exited:\n{_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up:\n{_tail(log)}")
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def started(command: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=_env(), cwd=str(log.parent)
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def admin(session: aiohttp.ClientSession, method: str, url: str, body: Any) -> Any:
    async with session.request(
        method, url, json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
    ) as response:
        payload = await response.json(content_type=None)
        if response.status >= 300:
            raise RuntimeError(f"{method} {url}: {response.status} {payload}")
        return payload


async def provision(proxy_url: str, orgs: list[str], end_users: int = 0) -> list[str]:
    """Per org a key whose every check runs and passes: key and org limits, key and org
    budgets (and, with ``end_users``, a default budget and limits for each end user of the
    org). Returns the keys' secrets, one per org."""
    limits = {"rpm": HUGE, "tpm": HUGE, "concurrency": 100_000}
    budget = {
        "period": "monthly",
        "limit_kind": "cost",
        "limit": 10**6,  # out of reach (cost limits stop at 9,007,199.25 units)
        "thresholds": [{"pct": 80, "action": "alert"}, {"pct": 100, "action": "block"}],
    }
    secrets: list[str] = []
    async with aiohttp.ClientSession() as session:
        for org in orgs:
            key = await admin(
                session,
                "POST",
                f"{proxy_url}/api/v1/keys",
                {"org_id": org, "name": "bench", "limits": limits},
            )
            await admin(session, "PUT", f"{proxy_url}/api/v1/orgs/{org}/limits", limits)
            await admin(
                session, "PUT", f"{proxy_url}/api/v1/llm/budgets/apikey/{key['id']}", budget
            )
            await admin(
                session,
                "PUT",
                f"{proxy_url}/api/v1/llm/budgets/org/{org}",
                {**budget, "limit_kind": "tokens", "limit": HUGE},
            )
            if end_users:
                await admin(
                    session,
                    "PUT",
                    f"{proxy_url}/api/v1/llm/budgets/external-user-default?org_id={org}",
                    budget,
                )
                await admin(
                    session,
                    "PUT",
                    f"{proxy_url}/api/v1/orgs/{org}/end-user-policy",
                    {"limits": limits},
                )
            secrets.append(key["key"])
    return secrets


CLUSTER_TARGETS = ("cluster", "cluster_replicated")
"""The (c) rows on the three-shard cluster: durability async, and replicated (WAIT)."""

LOAD_CPUS, SERVER_CPUS = {0}, {1}
"""``--pin``: the generator, the mock and Redis share CPU 0; the server under test has CPU 1."""

# --- measurements -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def command_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command, commands run inside scripts included; ``_reads``: socket reads,
    i.e. client round trips (a pipelined batch arriving at once is one read); ``_script_us``:
    microseconds spent inside scripts (EVALSHA)."""
    stats = client.info("commandstats")
    calls = {
        name.removeprefix("cmdstat_"): int(values["calls"])
        for name, values in stats.items()
        if isinstance(values, dict)
    }
    calls["_reads"] = int(client.info("stats")["total_reads_processed"])
    calls["_script_us"] = int(stats.get("cmdstat_evalsha", {}).get("usec", 0))
    return calls


WRK_SCRIPT = """-- generated by tests/bench/run_bench.py
local bodies = {{ [====[{buffered}]====], [====[{streamed}]====] }}
local ratio = {ratio}
-- unique: every prompt starts with its request number, so no cache anywhere sees a repeat
local unique = {unique}
-- end users: requests go on behalf of one of this many, round robin (0: none)
local end_users = {end_users}
local marker = '"content":"'
-- requests go round-robin over the keys (one per org: spread over a cluster's shards)
local keys = {{ {keys} }}
local headers = {{ ["Content-Type"] = "application/json" }}
local reqs, heads, tails = {{}}, {{}}, {{}}
local n = 0

function init(args)
  for i = 1, 2 do
    reqs[i] = {{}}
    for k = 1, #keys do
      headers["Authorization"] = "Bearer " .. keys[k]
      reqs[i][k] = wrk.format("POST", "{path}", headers, bodies[i])
    end
    local _, cut = string.find(bodies[i], marker, 1, true)
    heads[i], tails[i] = string.sub(bodies[i], 1, cut), string.sub(bodies[i], cut + 1)
  end
end

function request()
  local streamed = math.floor((n + 1) * ratio) > math.floor(n * ratio)
  n = n + 1
  local i = streamed and 2 or 1
  local k = n % #keys + 1
  if end_users > 0 then
    headers["X-On-Behalf-Of"] = "user-" .. (n % end_users)
    if not unique then
      headers["Authorization"] = "Bearer " .. keys[k]
      return wrk.format("POST", "{path}", headers, bodies[i])
    end
  end
  if unique then
    headers["Authorization"] = "Bearer " .. keys[k]
    return wrk.format("POST", "{path}", headers, heads[i] .. n .. " " .. tails[i])
  end
  return reqs[i][k]
end

{delay}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


WRK_PACING = """-- paced: after every answer each connection waits an exponentially distributed gap
-- (mean {mean_ms} ms), so together they offer a steady rate instead of all they can
function delay()
  return math.floor(-{mean_ms} * math.log(1 - math.random()) + 0.5)
end
"""


def write_wrk_script(
    path: Path,
    scenario: Scenario,
    keys: list[str],
    stream_ratio: float,
    pace_ms: float = 0.0,
    end_users: int = 0,
) -> Path:
    """``pace_ms`` > 0: each connection's mean gap between requests (see ``WRK_PACING``)."""
    buffered, streamed = scenario.body(False).decode(), scenario.body(True).decode()
    assert "]====]" not in buffered + streamed
    # Long prompts differ per request: the proxy remembers counts of long texts it has seen.
    unique = "true" if scenario.prompt_tokens > 1000 else "false"
    path.write_text(
        WRK_SCRIPT.format(
            buffered=buffered, streamed=streamed, ratio=stream_ratio, path=CHAT_PATH,
            keys=", ".join(f'"{key}"' for key in keys or ["none"]),
            unique=unique, delay=WRK_PACING.format(mean_ms=round(pace_ms, 3)) if pace_ms else "",
            end_users=end_users,
        )
    )  # fmt: skip
    return path


@dataclass
class Load:
    """One load run's figures, whichever generator made them."""

    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int
    generator_cpu_s: float

    def figures(self) -> dict[str, Any]:
        """Throughput and latency as every report row shows them."""
        return {
            "rps": round(self.requests / self.seconds, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p90_ms": round(self.p90_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "errors": self.errors,
        }


async def wrk_load(
    url: str, script: Path, seconds: int, connections: int, cpus: set[int] | None = None
) -> Load:
    before = children_cpu()
    process = await asyncio.create_subprocess_exec(
        "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout=30s",
        "-s", str(script), url + CHAT_PATH,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    if cpus is not None:
        os.sched_setaffinity(process.pid, cpus)
    out, err = await process.communicate()
    line = next((x for x in out.decode().splitlines() if x.startswith("BENCHJSON ")), None)
    if process.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({process.returncode}): {out.decode()} {err.decode()}")
    data = json.loads(line.removeprefix("BENCHJSON "))
    lat = data["latency_us"]
    return Load(
        requests=data["requests"],
        seconds=data["duration_us"] / 1e6,
        p50_ms=lat["p50"] / 1000,
        p90_ms=lat["p90"] / 1000,
        p99_ms=lat["p99"] / 1000,
        max_ms=lat["max"] / 1000,
        errors=sum(data["errors"].values()),
        generator_cpu_s=children_cpu() - before,
    )


async def python_load(
    url: str,
    prompt_file: Path,
    keys: list[str],
    seconds: int,
    connections: int,
    stream_ratio: float,
    rate: float | None = None,
) -> Load:
    """The fallback: the proxy's own ``llm-proxy loadtest`` (no admin key: no reconciliation).
    It repeats one prompt, so long prompts are counted once and then remembered: with it, the
    long scenario shows the proxy's best case, not its worst as with wrk."""
    report_path = prompt_file.with_suffix(".report.json")
    env = {k: v for k, v in _env().items() if k != "PROXY_ADMIN_KEY"}
    before = children_cpu()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "loadtest", "--url", url,
        *(arg for key in keys or ["none"] for arg in ("--key", key)),
        "--duration", str(seconds), "--concurrency", str(connections),
        "--stream-ratio", str(stream_ratio), "--prompt-file", str(prompt_file),
        "--max-tokens", str(MAX_TOKENS), "--model", MODEL, "--json", str(report_path),
        *(["--rate", str(rate)] if rate else []),
        env=env, cwd=str(REPO), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"loadtest failed: {out.decode()} {err.decode()}")
    report = json.loads(report_path.read_text())
    lat = report["latency_ms"]["all"] or {"p50": 0, "p90": 0, "p99": 0, "max": 0}
    answered = report["responses"]
    return Load(
        requests=answered,
        seconds=report["elapsed_s"],
        p50_ms=lat["p50"],
        p90_ms=lat["p90"],
        p99_ms=lat["p99"],
        max_ms=lat["max"],
        errors=answered - report["status"].get("200", 0) + sum(report["transport_errors"].values()),
        generator_cpu_s=children_cpu() - before,
    )


async def served_requests(proxy_url: str) -> int | None:
    """The proxy's own count of answered LLM requests (its Prometheus counter), or None.

    Unlike the generator's count it includes requests cut off when a run ends, which were still
    admitted and settled: the right denominator for Redis calls per request.
    """
    async with aiohttp.ClientSession() as session, session.get(proxy_url + "/metrics") as response:
        if response.status != 200:
            return None
        text = await response.text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("llm_proxy_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def quiesce(pids: list[int], timeout: float = 30.0) -> None:
    """Wait until the processes stop burning CPU: requests cut off by the previous run's end
    are still being served and settled, and must not count against the next run."""
    deadline = time.monotonic() + timeout
    last = sum(cpu_seconds(pid) for pid in pids)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = sum(cpu_seconds(pid) for pid in pids)
        if now - last < 0.01:
            return
        last = now


async def probe(url: str, stop: asyncio.Event, samples: list[float]) -> None:
    """A light request every 20 ms beside the load: its latency exposes event-loop stalls."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            start = time.perf_counter()
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as response:
                    await response.read()
                    samples.append(time.perf_counter() - start)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    redis_server: EmbeddedRedis
    redis_client: redis.Redis
    mock: subprocess.Popen[bytes]
    generator: str

    async def load(
        self, target: Target, scenario: Scenario, seconds: int, rate: float | None = None
    ) -> Load:
        """All the load the connections can make, or about ``rate`` requests per second."""
        if self.generator == "wrk":
            pace_ms = self.args.connections / rate * 1000 if rate else 0.0
            script = write_wrk_script(
                self.work / f"{scenario.name}-{target.name}{'-paced' if rate else ''}.lua",
                scenario,
                target.keys,
                self.args.stream_ratio,
                pace_ms,
                self.args.end_users,
            )
            return await wrk_load(
                target.url,
                script,
                seconds,
                self.args.connections,
                LOAD_CPUS if self.args.pin else None,
            )
        prompt_file = self.work / f"{scenario.name}.prompt.txt"
        prompt_file.write_text(scenario.prompt)
        return await python_load(
            target.url, prompt_file, target.keys, seconds, self.args.connections,
            self.args.stream_ratio, rate,
        )  # fmt: skip

    async def profile(self, target: Target, scenario: Scenario, out: Path) -> dict[str, Any]:
        """An extra, unmeasured run under py-spy: sampling costs the server CPU."""
        py_spy = bench_profile.executable()
        assert py_spy is not None
        print(f"{scenario.name}: {target.label} under py-spy...", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        raw = out / f"{scenario.name}-{target.name}.txt"
        sampler = bench_profile.record(py_spy, target.process.pid, self.args.duration, raw)
        await self.load(target, scenario, self.args.duration)
        _, err = await asyncio.to_thread(sampler.communicate)
        if sampler.returncode != 0 or not raw.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        return bench_profile.summarise(raw)

    async def paced(self, target: Target, scenario: Scenario, rate: float) -> dict[str, Any]:
        """Latency at a load both targets carry: below saturation, so it shows what each adds
        to a request rather than how long requests queue (which is throughput in disguise)."""
        pids = [target.process.pid, self.mock.pid, *target.redis.values()]
        quiesce(pids)
        result = await self.load(target, scenario, self.args.duration, rate)
        quiesce(pids)
        return {
            "target": target.label,
            "offered_rps": round(rate, 1),
            **result.figures(),
        }

    async def measure(self, target: Target, scenario: Scenario) -> dict[str, Any]:
        await self.load(target, scenario, self.args.warmup)
        pids = {"server": target.process.pid, "mock": self.mock.pid, **target.redis}
        quiesce(list(pids.values()))
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        machine_before, self_before = machine_cpu(), time.process_time()
        calls_before = {name: command_calls(c) for name, c in target.redis_stats.items()}
        served_before = await served_requests(target.url) if target.is_proxy else None
        stop, samples = asyncio.Event(), list[float]()
        prober = asyncio.create_task(probe(target.url + target.probe_path, stop, samples))
        result = await self.load(target, scenario, self.args.duration)
        stop.set()
        await prober
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}
        machine_after = machine_cpu()
        busy = machine_after[0] - machine_before[0]
        ours = sum(cpu.values()) + result.generator_cpu_s + time.process_time() - self_before
        quiesce(list(pids.values()))  # the cut-off requests end and settle
        calls_after = {name: command_calls(c) for name, c in target.redis_stats.items()}
        n = max(result.requests, 1)
        served = n
        if served_before is not None:
            served_after = await served_requests(target.url)
            served = max((served_after or 0) - served_before, 1)
        redis_each = {name: cpu.pop(name) for name in target.redis}
        redis_cpu = sum(redis_each.values())
        row: dict[str, Any] = {
            "target": target.label,
            "requests": result.requests,
            "seconds": round(result.seconds, 3),
            **result.figures(),
            "cpu_us_per_request": {
                **{name: round(seconds / n * 1e6, 1) for name, seconds in cpu.items()},
                **({"redis": round(redis_cpu / n * 1e6, 1)} if target.is_proxy else {}),
                "generator": round(result.generator_cpu_s / n * 1e6, 1),
            },
            # Other processes on this machine during the run: they skew every figure.
            "machine_busy_pct": round(busy / (machine_after[1] - machine_before[1]) * 100, 1),
            "other_processes_cpu_pct": round(max(busy - ours, 0.0) / result.seconds * 100, 1),
            "probe_ms": percentiles(samples) or {"count": 0, "p50": 0, "p99": 0, "max": 0},
        }
        if target.is_proxy:
            diffs = {
                shard: {
                    name: calls_after[shard].get(name, 0) - calls_before[shard].get(name, 0)
                    for name in calls_before[shard].keys() | calls_after[shard].keys()
                    if name != "info"
                }
                for shard in target.redis_stats
            }
            total: dict[str, int] = {}
            for diff in diffs.values():
                for name, d in diff.items():
                    total[name] = total.get(name, 0) + d
            per_command = {name: round(d / served, 3) for name, d in sorted(total.items()) if d > 0}
            reads = per_command.pop("_reads", 0.0)
            script_us = per_command.pop("_script_us", 0.0)
            row["redis_per_request"] = {
                "requests_served": served,
                "evalsha": per_command.get("evalsha", 0.0),
                "socket_reads": reads,
                "script_us": round(script_us, 1),
                "commands_incl_inside_scripts": round(sum(per_command.values()), 3),
                "by_command": per_command,
            }
            if len(target.redis_stats) > 1:
                row["redis_shards"] = shard_figures(diffs, n, redis_each)
        return row


def shard_figures(
    diffs: dict[str, dict[str, int]], requests: int, cpu: dict[str, float]
) -> dict[str, dict[str, float]]:
    """Per shard: its share of the script calls, its master's and replica's CPU per request of
    the run, and the master's CPU per request it served itself (two script calls each)."""
    calls = {shard: max(diff.get("evalsha", 0), 0) for shard, diff in diffs.items()}
    everything = max(sum(calls.values()), 1)
    shards: dict[str, dict[str, float]] = {}
    for shard in diffs:
        master = cpu[shard]
        replica = cpu.get(f"{shard}-replica", 0.0)
        own = max(calls[shard] / 2, 1)
        shards[shard] = {
            "share_of_requests": round(calls[shard] / everything, 3),
            "master_us_per_request": round(master / requests * 1e6, 1),
            "master_us_per_own_request": round(master / own * 1e6, 1),
            "replica_us_per_request": round(replica / requests * 1e6, 1),
        }
    return shards


def compare(
    rows: dict[str, dict[str, Any]], paced: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    b, c = rows["passthrough"], rows["proxy"]
    same_load = {}
    if paced:
        pb, pc = paced["passthrough"], paced["proxy"]
        same_load = {
            "paced_rps": pc["offered_rps"],
            "paced_added_p50_ms": round(pc["p50_ms"] - pb["p50_ms"], 3),
            "paced_added_p99_ms": round(pc["p99_ms"] - pb["p99_ms"], 3),
        }
    topologies = {}
    for name in CLUSTER_TARGETS:
        if name in rows:
            row = rows[name]
            topologies[name] = {
                "throughput_over_single": round(row["rps"] / c["rps"], 3) if c["rps"] else None,
                "throughput_ratio_over_b": round(row["rps"] / b["rps"], 3) if b["rps"] else None,
                "evalsha_per_request": row["redis_per_request"]["evalsha"],
            }
            if paced and name in paced:
                topologies[name]["paced_added_p50_ms_over_single"] = round(
                    paced[name]["p50_ms"] - paced["proxy"]["p50_ms"], 3
                )
                topologies[name]["paced_added_p99_ms_over_single"] = round(
                    paced[name]["p99_ms"] - paced["proxy"]["p99_ms"], 3
                )
    return {
        **same_load,
        "throughput_ratio_c_over_b": round(c["rps"] / b["rps"], 3) if b["rps"] else None,
        "added_p50_ms": round(c["p50_ms"] - b["p50_ms"], 3),
        "added_p99_ms": round(c["p99_ms"] - b["p99_ms"], 3),
        "redis_evalsha_per_request": c["redis_per_request"]["evalsha"],
        "redis_socket_reads_per_request": c["redis_per_request"]["socket_reads"],
        "redis_script_us_per_request": c["redis_per_request"]["script_us"],
        **({"topologies": topologies} if topologies else {}),
    }


def median_round(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The round whose (c)/(b) ratio is the median: (b) and (c) of one round ran back to back,
    so their ratio is steadier than either figure (this machine's noise moves both)."""
    ranked = sorted(rounds, key=lambda r: r["proxy"]["rps"] / max(r["passthrough"]["rps"], 1e-9))
    return ranked[len(ranked) // 2]


def render(result: dict[str, Any]) -> str:
    lines = []
    for name, scenario in result["scenarios"].items():
        for target, summary in scenario.get("profile", {}).items():
            lines.append(bench_profile.render(f"{name} / {target}", summary))
        lines.append(
            f"\nscenario {name}: prompt {scenario['prompt_tokens']} tokens, max_tokens "
            f"{MAX_TOKENS}, {result['stream_ratio']:.0%} streamed, {result['connections']} "
            f"connections, {result['duration_s']} s, generator {result['generator']}"
            + (f", {result['end_users']} end users" if result.get("end_users") else "")
        )
        lines.append(
            f"  {'target':<22}{'req/s':>9}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            f"{'errors':>8}   cpu µs/req server/mock/redis/gen   probe p99/max ms"
        )
        for row in scenario["targets"].values():
            cpu = row["cpu_us_per_request"]
            lines.append(
                f"  {row['target']:<22}{row['rps']:>9.1f}{row['p50_ms']:>9.2f}"
                f"{row['p90_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['max_ms']:>9.1f}"
                f"{row['errors']:>8}   {cpu['server']:>6.0f} /{cpu['mock']:>5.0f} /"
                f"{cpu.get('redis', 0):>5.0f} /{cpu['generator']:>5.0f}"
                f"{'':>14}{row['probe_ms']['p99']:.1f}/{row['probe_ms']['max']:.1f}"
            )
        for row in scenario["targets"].values():
            if "redis_shards" in row:
                shards = "; ".join(
                    f"{name} {f['share_of_requests']:.0%} of requests, master "
                    f"{f['master_us_per_request']:.0f} µs/req ({f['master_us_per_own_request']:.0f}"
                    f" per own), replica {f['replica_us_per_request']:.0f} µs/req"
                    for name, f in row["redis_shards"].items()
                )
                lines.append(f"  {row['target']} — Redis CPU per shard: {shards}")
        others = max(row["other_processes_cpu_pct"] for row in scenario["targets"].values())
        if others > 10:
            lines.append(
                f"  warning: other processes used up to {others:.0f}% of a core during these runs"
            )
        cmp = scenario["comparison"]
        if len(cmp["round_ratios"]) > 1:
            lines.append(
                f"  {len(cmp['round_ratios'])} rounds, (c)/(b) per round "
                f"{' / '.join(str(r) for r in cmp['round_ratios'])}: the rows above are the "
                "median round's"
            )
        lines.append(
            f"  (c)/(b) throughput {cmp['throughput_ratio_c_over_b']}; added latency at "
            f"saturation p50 {cmp['added_p50_ms']:+.2f} ms, p99 {cmp['added_p99_ms']:+.2f} ms; "
            f"Redis per request: {cmp['redis_evalsha_per_request']} EVALSHA, "
            f"{cmp['redis_socket_reads_per_request']} client round trips (socket reads), "
            f"{cmp['redis_script_us_per_request']} µs inside the scripts"
        )
        for row in scenario["targets"].values():
            if "redis_per_request" in row:
                r = row["redis_per_request"]
                lines.append(
                    f"  {row['target']}: script calls {r['evalsha']}/request, "
                    f"{r['script_us']} µs inside scripts/request, Redis CPU "
                    f"{row['cpu_us_per_request'].get('redis', 0):.0f} µs/request, proxy CPU "
                    f"{row['cpu_us_per_request']['server']:.0f} µs/request"
                )
        for name, topo in cmp.get("topologies", {}).items():
            line = (
                f"  {scenario['targets'][name]['target']}: {topo['throughput_over_single']} of "
                f"(c) single's throughput, {topo['throughput_ratio_over_b']} of (b); "
                f"{topo['evalsha_per_request']} EVALSHA per request"
            )
            if "paced_added_p50_ms_over_single" in topo:
                line += (
                    f"; at the same load p50 {topo['paced_added_p50_ms_over_single']:+.2f} ms, "
                    f"p99 {topo['paced_added_p99_ms_over_single']:+.2f} ms over (c) single"
                )
            lines.append(line)
        if "paced" in scenario:
            lines.append(
                f"  same load, paced at {cmp['paced_rps']:.0f} req/s offered "
                f"({result['paced_fraction']:.0%} of (c)'s throughput), {result['connections']} "
                "connections:"
            )
            for row in scenario["paced"].values():
                lines.append(
                    f"  {row['target']:<22}{row['rps']:>9.1f}{row['p50_ms']:>9.2f}"
                    f"{row['p90_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['max_ms']:>9.1f}"
                    f"{row['errors']:>8}"
                )
            lines.append(
                f"  added latency at the same load: p50 {cmp['paced_added_p50_ms']:+.2f} ms, "
                f"p99 {cmp['paced_added_p99_ms']:+.2f} ms"
            )
    return "\n".join(lines)


# --- memory mode --------------------------------------------------------------------------------


def _slope_per_minute(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (v - mean_v) for t, v in points)
    return cov / var * 60 if var else 0.0


async def memory_run(bench: Bench, proxy: Target, scenario: Scenario) -> dict[str, Any]:
    minutes = bench.args.memory_minutes
    seconds = int(minutes * 60)
    warmup = min(60.0, max(10.0, seconds * 0.25))
    interval = bench.args.memory_interval
    samples: list[dict[str, float]] = []
    started_at = time.monotonic()
    load = asyncio.create_task(bench.load(proxy, scenario, seconds))
    while not load.done():
        used = bench.redis_client.info("memory")["used_memory"] / 2**20
        samples.append(
            {
                "t": round(time.monotonic() - started_at, 1),
                "proxy_rss_mb": round(rss_mb(proxy.process.pid), 2),
                "redis_used_mb": round(used, 2),
                "redis_keys": int(bench.redis_client.dbsize()),
            }
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(load), interval)
    result = await load
    steady = [s for s in samples if s["t"] >= warmup] or samples[-1:]
    return {
        "minutes": minutes,
        "warmup_s": warmup,
        "requests": result.requests,
        "rps": round(result.requests / result.seconds, 1),
        "errors": result.errors,
        "proxy_rss_mb": {
            "start": samples[0]["proxy_rss_mb"],
            "after_warmup": steady[0]["proxy_rss_mb"],
            "end": samples[-1]["proxy_rss_mb"],
            "growth_after_warmup": round(
                samples[-1]["proxy_rss_mb"] - steady[0]["proxy_rss_mb"], 2
            ),
            "slope_mb_per_min": round(
                _slope_per_minute([(s["t"], s["proxy_rss_mb"]) for s in steady]), 3
            ),
        },
        # Per-request state in Redis is bounded: a lease lives until its settle, the usage
        # stream is capped, rate-limit buckets are one hash per scope. Growth here is a leak.
        "redis_used_mb": {
            "after_warmup": steady[0]["redis_used_mb"],
            "end": samples[-1]["redis_used_mb"],
            "slope_mb_per_min": round(
                _slope_per_minute([(s["t"], s["redis_used_mb"]) for s in steady]), 3
            ),
            "keys_end": samples[-1]["redis_keys"],
        },
        "samples": samples,
    }


# --- driver -------------------------------------------------------------------------------------


def choose_generator(wanted: str) -> str:
    if wanted == "python":
        return "python (llm-proxy loadtest)"
    if shutil.which("wrk") is None:
        installer = REPO / "scripts" / "install-wrk.sh"
        print("wrk not found; trying scripts/install-wrk.sh", file=sys.stderr)
        subprocess.run(["bash", str(installer)], check=False)
    if shutil.which("wrk") is not None:
        return "wrk"
    if wanted == "wrk":
        raise SystemExit("wrk is not available and could not be installed")
    print("wrk unavailable: falling back to the Python generator", file=sys.stderr)
    return "python (llm-proxy loadtest)"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    generator = choose_generator(args.generator)
    if args.end_users and generator != "wrk":
        raise SystemExit("--end-users needs wrk (scripts/install-wrk.sh)")
    chosen = scenarios(args.scenario, args.long_prompt_tokens)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        redis_server = stack.enter_context(EmbeddedRedis(work / "redis", persist=False))
        redis_client = redis.Redis.from_url(redis_server.url, decode_responses=True)
        stack.callback(redis_client.close)
        python = sys.executable
        mock_port, pass_port, proxy_port = free_port(), free_port(), free_port()
        mock_url = f"http://127.0.0.1:{mock_port}"
        mock = stack.enter_context(
            started(
                [python, "-m", "proxy", "mock-upstream", "--port", str(mock_port)],
                work / "mock.log",
            )
        )
        passthrough = stack.enter_context(
            started(
                [python, str(Path(__file__).with_name("passthrough.py")),
                 "--port", str(pass_port), "--upstream", mock_url],
                work / "passthrough.log",
            )
        )  # fmt: skip
        batched = args.batch_settles != "off"
        config = proxy_config(work / "proxy.toml", mock_url, redis_server.url, batch=batched)
        proxy = stack.enter_context(
            started(
                [python, "-m", "proxy", "--config", str(config), "--log-level", "WARNING",
                 "serve", "--port", str(proxy_port), "--workers", "1"],
                work / "proxy.log",
            )
        )  # fmt: skip
        targets = {
            "mock": Target(
                "(a) mock direct", "mock", mock_url, mock, "/v1/models", work / "mock.log"
            ),
            "passthrough": Target(
                "(b) bare pass-through", "passthrough", f"http://127.0.0.1:{pass_port}",
                passthrough, "/healthz", work / "passthrough.log",
            ),
            "proxy": Target(
                "(c) llm-proxy", "proxy", f"http://127.0.0.1:{proxy_port}", proxy, "/healthz",
                work / "proxy.log", redis={"redis": redis_server.pid or 0},
                redis_stats={"redis": redis_client},
            ),
        }  # fmt: skip
        if args.batch_settles == "both" and not args.memory_minutes:
            targets["proxy"].label = "(c) llm-proxy batched"
            targets["proxy_unbatched"] = start_unbatched_target(
                stack, work, mock_url, redis_server.url, targets["proxy"]
            )
        if args.cluster_orgs and not args.memory_minutes:
            targets.update(start_cluster_targets(stack, work, mock_url))
        if args.pin:
            # The system under test alone on one core, everything else on the other: steadier
            # CPU-per-request figures for comparing two versions of the proxy.
            redis_pids = [pid for t in targets.values() for pid in t.redis.values()]
            for pid in (mock.pid, *redis_pids):
                os.sched_setaffinity(pid, LOAD_CPUS)
            for target in targets.values():
                if target.name != "mock":
                    os.sched_setaffinity(target.process.pid, SERVER_CPUS)
        for target in targets.values():
            await wait_ready(target.url + target.probe_path, target.process, target.log)
            if target.is_proxy:
                await wait_ready(target.url + "/readyz", target.process, target.log)
        orgs = [ORG] if args.orgs <= 1 else [f"{ORG}-k{n}" for n in range(args.orgs)]
        targets["proxy"].keys = await provision(targets["proxy"].url, orgs, args.end_users)
        if "proxy_unbatched" in targets:  # the same Redis, so the same keys
            targets["proxy_unbatched"].keys = targets["proxy"].keys
        if "cluster" in targets:
            orgs = [f"{ORG}-{n}" for n in range(args.cluster_orgs)]
            keys = await provision(targets["cluster"].url, orgs, args.end_users)
            for name in CLUSTER_TARGETS:
                targets[name].keys = keys
        bench = Bench(args, work, redis_server, redis_client, mock, generator)
        result: dict[str, Any] = {
            "generator": generator,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "stream_ratio": args.stream_ratio,
            "paced_fraction": args.paced_fraction,
            "max_tokens": MAX_TOKENS,
            "cpus": os.cpu_count(),
            "pinned": args.pin,
            "end_users": args.end_users,
            "scenarios": {},
        }
        if args.memory_minutes:
            print(f"memory run: {args.memory_minutes} min against (c)...", file=sys.stderr)
            result["memory"] = await memory_run(bench, targets["proxy"], chosen[0])
            return result
        for scenario in chosen:
            rounds: list[dict[str, dict[str, Any]]] = []
            for number in range(1, args.rounds + 1):
                measured = {}
                for name, target in targets.items():
                    print(f"{scenario.name}: {target.label} (round {number})...", file=sys.stderr)
                    measured[name] = await bench.measure(target, scenario)
                rounds.append(measured)
            rows = median_round(rounds)
            paced: dict[str, dict[str, Any]] = {}
            if args.paced_fraction:
                rate = rows["proxy"]["rps"] * args.paced_fraction
                extra = (t for t in ("proxy_unbatched", *CLUSTER_TARGETS) if t in rows)
                for name in ("passthrough", "proxy", *extra):
                    print(f"{scenario.name}: {targets[name].label} paced...", file=sys.stderr)
                    paced[name] = await bench.paced(targets[name], scenario, rate)
            result["scenarios"][scenario.name] = {
                "prompt_tokens": scenario.prompt_tokens,
                "prompt_bytes": len(scenario.body(False)),
                "targets": rows,
                "comparison": {
                    **compare(rows, paced),
                    "round_ratios": [
                        round(r["proxy"]["rps"] / r["passthrough"]["rps"], 3) for r in rounds
                    ],
                },
                **({"paced": paced} if paced else {}),
            }
            if args.profile:
                result["scenarios"][scenario.name]["profile"] = {
                    name: await bench.profile(targets[name], scenario, Path(args.profile))
                    for name in ("passthrough", "proxy")
                }
        return result


def start_unbatched_target(
    stack: contextlib.ExitStack[Any], work: Path, mock_url: str, redis_url: str, proxy: Target
) -> Target:
    """A second proxy on the same Redis with ``[limits] batch_settles = false``: settles one
    script call each, as before batching (measured after (c), never at the same time)."""
    port = free_port()
    config = proxy_config(work / "proxy-unbatched.toml", mock_url, redis_url, batch=False)
    log = work / "proxy-unbatched.log"
    process = stack.enter_context(
        started(
            [sys.executable, "-m", "proxy", "--config", str(config), "--log-level",
             "WARNING", "serve", "--port", str(port), "--workers", "1"],
            log,
        )
    )  # fmt: skip
    return Target(
        "(c) settles unbatched", "proxy_unbatched", f"http://127.0.0.1:{port}", process,
        "/healthz", log, redis=proxy.redis, redis_stats=proxy.redis_stats,
    )  # fmt: skip


def start_cluster_targets(
    stack: contextlib.ExitStack[Any], work: Path, mock_url: str
) -> dict[str, Target]:
    """A three-shard Redis Cluster (one replica per master) and two proxies on it: durability
    async and replicated. Shards are named by their slot ranges' order."""
    cluster = stack.enter_context(running(RedisClusterTopology(work / "cluster")))
    redis_pids: dict[str, int] = {}
    redis_stats: dict[str, redis.Redis] = {}
    for index, (master, replica) in enumerate(cluster.shards(), start=1):
        redis_pids[f"shard{index}"] = master.pid or 0
        redis_pids[f"shard{index}-replica"] = replica.pid or 0
        stats = redis.Redis(port=master.port, decode_responses=True)
        stack.callback(stats.close)
        redis_stats[f"shard{index}"] = stats
    targets = {}
    for name, durability, label in (
        ("cluster", "async", "(c) cluster, 3 shards"),
        ("cluster_replicated", "replicated", "(c) cluster, replicated"),
    ):
        port = free_port()
        config = proxy_config(work / f"proxy-{name}.toml", mock_url, cluster.url, durability)
        log = work / f"proxy-{name}.log"
        process = stack.enter_context(
            started(
                [sys.executable, "-m", "proxy", "--config", str(config), "--log-level",
                 "WARNING", "serve", "--port", str(port), "--workers", "1"],
                log,
            )
        )  # fmt: skip
        targets[name] = Target(
            label, name, f"http://127.0.0.1:{port}", process, "/healthz", log,
            redis=redis_pids, redis_stats=redis_stats,
        )  # fmt: skip
    return targets


def render_memory(memory: dict[str, Any]) -> str:
    rss = memory["proxy_rss_mb"]
    return (
        f"memory: {memory['minutes']} min at {memory['rps']} req/s ({memory['errors']} errors); "
        f"proxy RSS {rss['start']} MB at start, {rss['after_warmup']} MB after "
        f"{memory['warmup_s']:.0f} s warm-up, {rss['end']} MB at the end: growth "
        f"{rss['growth_after_warmup']:+} MB, slope {rss['slope_mb_per_min']:+} MB/min; Redis "
        f"used {memory['redis_used_mb']['after_warmup']} -> {memory['redis_used_mb']['end']} MB "
        f"({memory['redis_used_mb']['slope_mb_per_min']:+} MB/min, "
        f"{memory['redis_used_mb']['keys_end']} keys)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--rounds", type=int, default=1, help="measure (a), (b), (c) N times; report the median"
    )
    parser.add_argument("--scenario", choices=("short", "long", "both"), default="both")
    parser.add_argument("--stream-ratio", type=float, default=0.5)
    parser.add_argument(
        "--paced-fraction",
        type=float,
        default=0.5,
        help="also measure (b) and (c) at this share of (c)'s throughput; 0: skip",
    )
    parser.add_argument("--long-prompt-tokens", type=int, default=50_000)
    parser.add_argument(
        "--cluster-orgs",
        type=int,
        default=24,
        help="also run (c) on a three-shard Redis Cluster, keys over this many orgs; 0: skip",
    )
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument(
        "--batch-settles",
        choices=("on", "off", "both"),
        default="off",
        help="(c) with [limits] batch_settles off (the default config), on, or both (a second "
        "proxy, batched, beside the unbatched one)",
    )
    parser.add_argument(
        "--orgs",
        type=int,
        default=1,
        help="many keys: spread (c)'s load over N orgs, one key each (settles batch per org)",
    )
    parser.add_argument("--json", dest="json_path", help="write the results here")
    parser.add_argument(
        "--memory-minutes", type=float, default=0, help="instead: RSS under load for N minutes"
    )
    parser.add_argument("--memory-interval", type=float, default=5.0, help="seconds per sample")
    parser.add_argument(
        "--profile", metavar="DIR", help="also sample (b) and (c) with py-spy; raw stacks here"
    )
    parser.add_argument(
        "--end-users",
        type=int,
        default=0,
        metavar="N",
        help="requests on behalf of N end users, with end-user budgets and limits (wrk only)",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="server under test on CPU 1, everything else on CPU 0 (steadier A/B figures)",
    )
    args = parser.parse_args()
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin needs two CPUs")
    if args.profile and bench_profile.executable() is None:
        parser.error("--profile needs py-spy: pip install -e '.[bench]'")
    if not 0 <= args.stream_ratio <= 1 or args.duration < 1 or args.connections < 1:
        parser.error("--stream-ratio must be 0..1, --duration and --connections positive")
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    if args.end_users < 0 or (args.end_users and args.generator == "python"):
        parser.error("--end-users takes N >= 0 and needs wrk")
    if not 0 <= args.paced_fraction < 1:
        parser.error("--paced-fraction must be in [0, 1)")
    result = asyncio.run(run(args))
    print(render_memory(result["memory"]) if "memory" in result else render(result))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
