"""Where a server's CPU goes under the benchmark's load: py-spy samples, summarised.

``run_bench.py --profile DIR`` runs one extra load per profiled target (after the measured runs,
so sampling never skews the figures) while ``py-spy record --format raw`` samples the server,
then prints the share of samples by component (proxy module, aiohttp, asyncio, Redis client,
tokenizer, ...) and the proxy's own functions by inclusive share. py-spy comes from the
``bench`` extra: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")
_COMPONENTS = {
    "aiohttp": "aiohttp",
    "multidict": "aiohttp",
    "yarl": "aiohttp",
    "uvloop": "event loop",
    "asyncio": "event loop",
    "redis": "redis-py",
    "hiredis": "redis-py",
    "tiktoken": "tiktoken",
    "prometheus_client": "prometheus_client",
    "json": "json",
    "pydantic": "pydantic",
}
"""Top-level package of a frame's file (py-spy shortens paths to ``package/module.py``)."""


def executable() -> str | None:
    """py-spy on PATH, or beside this interpreter (a venv that was not activated)."""
    beside = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def record(
    py_spy: str, pid: int, seconds: int, output: Path, rate: int = 250
) -> subprocess.Popen[bytes]:
    """Starts sampling; the caller waits on the returned process (it ends after ``seconds``)."""
    command = [
        py_spy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
        "--format", "raw", "--output", str(output), "--nonblocking",
    ]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _component(file: str) -> str:
    parts = Path(file).parts
    if "proxy" in parts:
        return "proxy." + Path(file).stem
    for part in parts:
        if part in _COMPONENTS:
            return _COMPONENTS[part]
    return "other (stdlib, C)"


def _frames(stack: str) -> list[tuple[str, str]]:
    frames = []
    for part in stack.split(";"):
        match = _FRAME.match(part)
        if match:
            frames.append((match["func"], match["file"]))
        elif part:
            frames.append((part, ""))
    return frames


def summarise(raw: Path, top: int = 25) -> dict[str, object]:
    """Self time by component (leaf frame), and inclusive time of the proxy's functions."""
    by_component: Counter[str] = Counter()
    proxy_inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = _frames(stack)
        if not frames:
            continue
        total += count
        by_component[_component(frames[-1][1])] += count
        seen: set[str] = set()
        for func, file in frames:
            if "proxy" in Path(file).parts:
                name = f"{Path(file).stem}.{func}"
                if name not in seen:
                    seen.add(name)
                    proxy_inclusive[name] += count

    def share(n: int) -> float:
        return round(n / total * 100, 1) if total else 0.0

    return {
        "samples": total,
        "self_pct_by_component": {k: share(v) for k, v in by_component.most_common()},
        "inclusive_pct_proxy_functions": {k: share(v) for k, v in proxy_inclusive.most_common(top)},
    }


def render(name: str, summary: dict[str, object]) -> str:
    lines = [f"\nprofile of {name}: {summary['samples']} samples"]
    lines.append("  self time by component:")
    components = summary["self_pct_by_component"]
    assert isinstance(components, dict)
    lines += [f"    {pct:5.1f}%  {component}" for component, pct in components.items()]
    functions = summary["inclusive_pct_proxy_functions"]
    assert isinstance(functions, dict)
    if functions:
        lines.append("  proxy functions, inclusive:")
        lines += [f"    {pct:5.1f}%  {function}" for function, pct in functions.items()]
    return "\n".join(lines)
