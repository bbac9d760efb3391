"""What the Gemini and Vertex tests share: a service-account file whose ``token_uri`` is the
mock's token endpoint, the proxy's Google upstreams and models, and the books check (recorded
spend against the usage the mock reported)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from proxy.catalog.pricing import cost_nano, price_from_config
from proxy.config import ModelConfig, PriceConfig, UpstreamConfig

PRICE = PriceConfig(input="0.3", cached_input="0.03", output="2.5")
PROJECT = "proj-1"
LOCATION = "us-central1"


def service_account_file(directory: Path, token_uri: str) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = directory / "service-account.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": PROJECT,
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": f"proxy@{PROJECT}.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )
    )
    return path


def upstreams(root: str, credentials: Path) -> list[UpstreamConfig]:
    """``root``: the mock's origin."""
    common: dict[str, Any] = {"forward_headers": ["x-mock-*"]}
    vertex: dict[str, Any] = {
        "kind": "vertex",
        "base_url": root,
        "project": PROJECT,
        "location": LOCATION,
        "credentials_file": str(credentials),
        **common,
    }
    return [
        UpstreamConfig(
            name="gemini",
            kind="gemini",
            base_url=f"{root}/v1beta",
            api_key_env="TEST_GEMINI_KEY",
            **common,
        ),
        UpstreamConfig(name="vertex", **vertex),
        UpstreamConfig(name="vertex-claude", publisher="anthropic", **vertex),
    ]


def models() -> list[ModelConfig]:
    return [
        ModelConfig(name="gemini-2.5-flash", upstream="gemini", price=PRICE, max_output_tokens=64),
        ModelConfig(name="gemini-2.5-pro", upstream="vertex", price=PRICE, max_output_tokens=64),
        ModelConfig(name="gemini-embedding-001", upstream="gemini", price=PRICE, kind="embedding"),
        ModelConfig(
            name="vertex-embedding",
            upstream="vertex",
            upstream_model="gemini-embedding-001",
            price=PRICE,
            kind="embedding",
        ),
        ModelConfig(name="claude-sonnet-4-5", upstream="vertex-claude", price=PRICE),
    ]


def reported_cost(reported: Any) -> int:
    """What the mock's reported usage costs at ``PRICE``, summed per answer as the proxy
    settles (each answer rounded up on its own)."""
    price = price_from_config(PRICE)
    return sum(
        cost_nano(price, u.prompt_tokens, u.completion_tokens, u.cached_tokens) for u in reported
    )
