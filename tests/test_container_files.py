"""The Dockerfile and docker-compose.yml, checked without a Docker engine (none runs here).

What can be checked is: the files parse; the image runs the same CLI the tests run, as a
non-root user, with nothing secret copied in; its health check asks /readyz and works against
a real proxy; compose wires Redis (persistent) to the proxy through ``REDIS_URL``, which the
proxy's configuration really reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer
from conftest import REPO, start_proxy_process, write_config

from proxy.cli import build_parser, cmd_serve
from proxy.config import load_settings
from proxy.store.embedded_redis import free_port

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - what a container must listen on
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD)", re.IGNORECASE)
SECRET_FILE = re.compile(r"(^|/)(\.env|.*\.pem|.*\.key|id_rsa|id_ed25519|secrets?)(/|$)")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str:
        found = self.all(keyword)
        assert found, f"no {keyword} in stage {self.name or self.base}"
        return found[-1]


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per build stage: comments dropped, continuation lines joined."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        else:
            assert stages, f"{keyword} before FROM"
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return dockerfile_stages((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(final: Stage) -> list[str]:
    args = final.last("HEALTHCHECK")
    options, _, command = args.partition("CMD ")
    assert "--interval" in options and "--timeout" in options
    return exec_form(command)


# --- Dockerfile --------------------------------------------------------------------------------


def test_multi_stage_build_on_python_311_slim(stages: list[Stage], final: Stage) -> None:
    assert len(stages) >= 2
    builder = stages[0]
    assert builder.name and builder.base == final.base == "python:3.11-slim"
    assert any("pip install ." in run for run in builder.all("RUN"))
    assert f"--from={builder.name} /opt/venv /opt/venv" in final.all("COPY")


def test_builder_proves_the_vendored_encodings_load_offline(stages: list[Stage]) -> None:
    runs = " ".join(stages[0].all("RUN"))
    assert "get_encoding('o200k_base')" in runs
    # And that check holds for the package as built here (vendored, no download).
    subprocess.run(
        [sys.executable, "-c", "from proxy.catalog.tokenizer import get_encoding; "
         "get_encoding('o200k_base'); get_encoding('cl100k_base')"],
        check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )  # fmt: skip


def test_entrypoint_runs_the_cli_the_tests_run(final: Stage) -> None:
    entrypoint = exec_form(final.last("ENTRYPOINT"))
    command = exec_form(final.last("CMD"))
    assert entrypoint == ["llm-proxy"]
    assert command == ["serve", "--host", ALL_INTERFACES]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llm-proxy"] == "proxy.cli:main"
    args = build_parser().parse_args(command)
    assert args.func is cmd_serve and args.host == ALL_INTERFACES
    help_run = subprocess.run(
        [sys.executable, "-m", "proxy", *command, "--help"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert help_run.returncode == 0, help_run.stderr
    assert "--workers" in help_run.stdout


def test_image_reads_the_shipped_config(final: Stage) -> None:
    """PROXY_CONFIG points at the copied default config, which loads and takes REDIS_URL."""
    env = dict(line.split("=", 1) for line in " ".join(final.all("ENV")).split())
    config_in_image = env["PROXY_CONFIG"]
    copied = {dst: src for src, dst in (c.split() for c in final.all("COPY") if "--from" not in c)}
    source = REPO / copied[config_in_image]
    settings = load_settings(source, {"REDIS_URL": "redis://redis:6379/0"})
    assert settings.redis.url == "redis://redis:6379/0"
    assert settings.server.port == 8080
    assert "8080" in final.last("EXPOSE")


def test_runs_as_a_non_root_user(final: Stage) -> None:
    user = final.last("USER").split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(final.all("RUN"))
    match = re.search(rf"useradd\b[^&;]*--uid (\d+)[^&;]*\b{user}\b", created)
    assert match and int(match.group(1)) != 0
    # Nothing after USER switches back.
    keywords = [kw for kw, _ in final.instructions]
    assert "USER" not in keywords[keywords.index("USER") + 1 :]


def test_final_stage_copies_no_secrets(final: Stage) -> None:
    for copy in final.all("COPY") + final.all("ADD"):
        sources = [p for p in copy.split()[:-1] if not p.startswith("--")]
        for source in sources:
            assert not SECRET_FILE.search(source), copy
            assert source in ("/opt/venv", "config/proxy.toml"), copy
    for env in final.all("ENV") + final.all("ARG"):
        for assignment in env.split():
            name = assignment.split("=", 1)[0]
            assert not SECRET_NAME.search(name), f"secret-looking variable baked in: {env}"
    config = (REPO / "config" / "proxy.toml").read_text()
    assert "sk-" not in config and "api_key_env" in config


def test_dockerignore_keeps_secrets_and_local_state_out() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".env", ".git", ".venv", ".proxy-data", "*.pem", "*.key"} <= ignored


def test_healthcheck_asks_readyz_with_python(final: Stage) -> None:
    command = healthcheck_command(final)
    assert command[0] == "python"
    assert "/readyz" in command[-1]
    assert not any("curl" in part or "wget" in part for part in command)


@pytest.mark.slow
async def test_healthcheck_command_passes_only_when_ready(
    final: Stage, tmp_path: Path, redis_url: str, mock_upstream: TestServer
) -> None:
    """The image's very command, pointed (via the port variable) at a real proxy process."""
    command = [sys.executable, *healthcheck_command(final)[1:]]
    port = free_port()
    env = {**os.environ, "PROXY__SERVER__PORT": str(port)}
    down = await asyncio.create_subprocess_exec(
        *command, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    assert await down.wait() != 0
    config = write_config(tmp_path / "proxy.toml", str(mock_upstream.make_url("/v1")), redis_url)
    server = await start_proxy_process(config, tmp_path / "proxy.log", port=port)
    try:
        # Not subprocess.run: this loop serves the mock upstream meanwhile.
        check = await asyncio.create_subprocess_exec(*command, env=env)
        assert await check.wait() == 0
    finally:
        server.stop()


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_runs_redis_with_persistence(compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    volume, _, mount = redis["volumes"][0].partition(":")
    assert mount == "/data" and volume in compose["volumes"]
    assert "ping" in " ".join(redis["healthcheck"]["test"])


def test_compose_wires_the_proxy_to_redis(compose: dict[str, Any]) -> None:
    proxy = compose["services"]["proxy"]
    assert proxy["build"] == "."
    assert "8080:8080" in proxy["ports"]
    assert proxy["depends_on"] == {"redis": {"condition": "service_healthy"}}
    env = proxy["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    settings = load_settings(REPO / "config" / "proxy.toml", {"REDIS_URL": env["REDIS_URL"]})
    assert settings.redis.url == "redis://redis:6379/0"


def test_compose_takes_credentials_from_the_environment(compose: dict[str, Any]) -> None:
    env = compose["services"]["proxy"]["environment"]
    for name in ("OPENAI_API_KEY", "PROXY_ADMIN_KEY"):
        assert re.fullmatch(rf"\$\{{{name}(:?[?-][^}}]*)?\}}", env[name]), env[name]
