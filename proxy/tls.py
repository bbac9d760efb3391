"""HTTPS on the proxy's own port (``[server] tls_cert`` / ``tls_key``).

Why the proxy terminates TLS itself at all: boto3 (1.44) sends a Bedrock API key — the proxy
key, for Bedrock clients — to ``https`` endpoints only. Behind a TLS-terminating load balancer
none of this is needed (see the deployment docs).
"""

from __future__ import annotations

import logging
import ssl

from proxy.config import ServerConfig

log = logging.getLogger(__name__)


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS on the proxy's own port when ``[server] tls_cert``/``tls_key`` are set: TLS 1.2
    and 1.3 only, HTTP/1.1 by ALPN. Clients such as boto3 send a Bedrock API key to https
    endpoints only. SIGHUP reloads the pair into the same context (``reload_tls``): new
    handshakes use the new certificate, open connections keep theirs."""
    if not server.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.load_cert_chain(server.tls_cert, server.tls_key)
    return context


def reload_tls(context: ssl.SSLContext | None, server: ServerConfig) -> None:
    """SIGHUP: re-read the certificate and key (a renewed pair); a bad pair keeps the old."""
    if context is None:
        return
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:
        log.error("SIGHUP: keeping the current TLS certificate: %s", exc)
    else:
        log.info("SIGHUP: TLS certificate reloaded from %s", server.tls_cert)
