"""Which webhook targets may be contacted: http(s) only, and never a loopback, private,
link-local, multicast, reserved, unspecified or cloud-metadata address (nor an IPv6 address
embedding one), unless inside ``webhooks.allow_private_targets``. The host is resolved here and
the connection goes to the address that was checked, so DNS cannot rebind in between."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TypeAlias

from yarl import URL

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
METADATA_ADDRESSES = frozenset(
    {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
)
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class TargetRefused(Exception):
    """A target that must never be contacted: retrying cannot help, so the delivery fails."""


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """IPv4 addresses an IPv6 address reaches or stands for: 6to4 (2002::/16), Teredo
    (2001::/32: server and client), NAT64 (64:ff9b::/96) and IPv4-compatible (::/96)."""
    found: list[ipaddress.IPv4Address] = []
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in NAT64_PREFIX or (address in IPV4_COMPATIBLE and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _refusal(address: IPAddress) -> str | None:
    """Why this address is not a public unicast one; None when it is."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return "a site-local address (fec0::/10, deprecated)"
        for inner in _embedded_ipv4(address):
            why = _refusal(inner)
            if why is not None:
                return f"an IPv6 address embedding {inner}, {why}"
    checks = (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-public", not address.is_global),
    )
    return next((f"a {name} address" for name, hit in checks if hit), None)


def _normal(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def resolve_target(url: URL, allowed: list[IPNetwork]) -> IPAddress:
    """The address to connect to: the first one the host resolves to that may be contacted.

    Raises TargetRefused (permanent) for bad schemes and forbidden addresses; OSError for a
    failed lookup (transient).
    """
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise TargetRefused("refused target: only http and https URLs with a host are delivered")
    host = url.raw_host
    try:
        candidates: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, url.port, type=socket.SOCK_STREAM)
        candidates = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    reasons: list[str] = []
    for candidate in candidates:
        address = _normal(candidate)
        why = None if any(address in net for net in allowed) else _refusal(address)
        if why is None:
            return address
        reasons.append(f"{address} is {why}")
    raise TargetRefused(
        f"refused target {host}: {reasons[0] if reasons else 'no address'}"
        " (allow it with webhooks.allow_private_targets)"
    )


def host_header(url: URL) -> str:
    """The Host header of ``url`` (the request itself goes to the checked address)."""
    host = url.raw_host or ""
    if ":" in host:
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"
