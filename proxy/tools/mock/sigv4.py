"""The mock's check of a Bedrock request's credential: a SigV4 signature recomputed with
botocore from the configured test credentials (a wrong key, secret, region format, body or
signed header fails), or a configured Bedrock API key as ``Authorization: Bearer``.

The signature is recomputed by botocore's own signer (``SigV4Auth``) over what arrived — the
raw path, the headers the signature names, the body — so the mock checks what AWS checks
without sharing code with the proxy's signing (which goes through ``AWSRequest`` and
``add_auth``, with the proxy's own URL and headers)."""

from __future__ import annotations

import hmac
import re

from aiohttp import web

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/"
    r"(?P<service>[a-z0-9-]+)/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})"
)


def problem(
    request: web.Request,
    headers: dict[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    api_key: str | None,
) -> str | None:
    """None when the request is authenticated; else what is wrong with it."""
    authorization = headers.get("authorization", "")
    if authorization.startswith("Bearer "):
        if api_key and hmac.compare_digest(authorization[7:].encode(), api_key.encode()):
            return None
        return "The Bedrock API key is not valid."
    found = _AUTH.fullmatch(authorization)
    if found is None:
        return "Missing or malformed SigV4 Authorization header."
    if found["key"] != access_key:
        return "The security token included in the request is invalid."
    if found["service"] != "bedrock":
        return f"Credential should be scoped to correct service: 'bedrock', not {found['service']}."
    amz_date = headers.get("x-amz-date", "")
    if not amz_date.startswith(found["date"]):
        return "X-Amz-Date does not match the credential scope's date."
    signed = found["signed"].split(";")
    if "host" not in signed or "x-amz-date" not in signed:
        return "The signature must cover host and x-amz-date."
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = f"http://{headers.get('host', '')}{request.raw_path}"
    copy = AWSRequest("POST", url, data=body, headers={n: headers.get(n, "") for n in signed})
    copy.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret_key), "bedrock", found["region"])
    canonical = signer.canonical_request(copy)
    expected = signer.signature(signer.string_to_sign(copy, canonical), copy)
    if not hmac.compare_digest(expected, found["signature"]):
        return "The request signature we calculated does not match the signature you provided."
    return None
