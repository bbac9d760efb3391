"""AWS Bedrock's runtime API as an upstream: its paths (the model id is part of the path) and
its credential — a Bedrock API key sent as ``Authorization: Bearer`` (``api_key_env``), or
else a SigV4 signature from botocore's credential chain (environment, shared profile, web
identity, container or instance role; refreshed by botocore before they expire).

The signature covers the method, path, signed headers and a hash of the body, so it is made
last, over the final body and headers (``UpstreamClient.send``). botocore is imported only
when a Bedrock upstream is configured; it is the ``bedrock`` extra of the package.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from proxy.config import ConfigError, UpstreamConfig
from proxy.errors import ApiError

ACTIONS = {
    "converse": "converse",
    "converse-stream": "converse-stream",
    "invoke": "invoke",
    "invoke-with-response-stream": "invoke-with-response-stream",
}
"""Endpoint (the dialect's name) -> the last segment of the runtime API's path."""
SERVICE = "bedrock"
"""The SigV4 signing name of ``bedrock-runtime``."""
_SIGNERS: dict[str, _Signer] = {}


def url(upstream: UpstreamConfig, endpoint: str, model_id: str) -> str:
    """``{base_url}/model/{modelId}/{action}``, the id percent-encoded as boto3 does (an ARN's
    ``:`` and ``/`` included), so the path is one segment whatever the id."""
    return f"{upstream.base_url}/model/{quote(model_id, safe='')}/{ACTIONS[endpoint]}"


def credential_headers(upstream: UpstreamConfig) -> list[tuple[str, str]]:
    """A Bedrock API key when configured; otherwise nothing here (the request is signed)."""
    credential = upstream.credential()
    return [("Authorization", f"Bearer {credential}")] if credential else []


class _Signer:
    """One upstream's SigV4 signer over botocore's (refreshing) credentials."""

    def __init__(self, upstream: UpstreamConfig) -> None:
        try:
            import botocore.session
            from botocore.auth import SigV4Auth
            from botocore.awsrequest import AWSRequest
        except ImportError:  # pragma: no cover - the extra is installed in tests
            raise ConfigError(
                f"upstreams.{upstream.name}: kind = 'bedrock' signs with botocore; install it "
                "with `pip install 'llm-budget-proxy[bedrock]'`"
            ) from None
        from botocore.exceptions import BotoCoreError

        self._auth = SigV4Auth
        self._request = AWSRequest
        self._failure = BotoCoreError
        self._name = upstream.name
        self._region = upstream.region
        credentials = botocore.session.get_session().get_credentials()
        if credentials is None:
            raise ConfigError(
                f"upstreams.{upstream.name}: no AWS credentials found (environment, profile, "
                "web identity, container or instance role), and no api_key_env"
            )
        self._credentials = credentials

    def sign(
        self, address: str, body: bytes, headers: list[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        """Refreshable credentials are refreshed here by botocore when they near expiry."""
        try:
            credentials = self._credentials.get_frozen_credentials()
            request: Any = self._request("POST", address, data=body, headers=dict(headers))
            self._auth(credentials, SERVICE, self._region).add_auth(request)
        except self._failure:
            raise ApiError(
                502,
                f"The upstream '{self._name}' could not be signed for: its AWS credentials "
                "could not be refreshed.",
                type="server_error",
                code="upstream_credentials",
            ) from None
        return list(request.headers.items())


def signer(upstream: UpstreamConfig) -> _Signer:
    """Built at start-up (``check``) so a missing botocore or credential chain is found then."""
    found = _SIGNERS.get(upstream.name)
    if found is None:
        found = _SIGNERS[upstream.name] = _Signer(upstream)
    return found


def check(upstreams: list[UpstreamConfig]) -> None:
    """Start-up: every signing Bedrock upstream has botocore and a credential source."""
    for upstream in upstreams:
        if upstream.kind == "bedrock" and not upstream.credential():
            _SIGNERS.pop(upstream.name, None)
            signer(upstream)


def sign(
    upstream: UpstreamConfig, address: str, body: bytes, headers: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The headers with SigV4's (``Authorization``, ``X-Amz-Date``, the session token) added;
    unchanged when a Bedrock API key is the credential."""
    if upstream.credential():
        return headers
    return signer(upstream).sign(address, body, headers)
