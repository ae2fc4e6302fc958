"""Webhook URL validation: http(s) only, and only globally routable addresses unless allowed (SSRF guard).

Checked when a subscription is added and again before each delivery. The delivery connects to the
very address that passed the check (``resolve_webhook``), so a name that resolves elsewhere on a
second lookup (DNS rebinding) cannot lead the request to an internal host. Through an HTTP proxy
(``proxied_webhook``) only the URL itself can be checked: the proxy resolves the name.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> addresses; replaceable in tests to play a rebinding resolver.
Resolver = Callable[[str, int], list[IPAddress]]

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class WebhookURLError(ValueError):
    """The URL is malformed or points where webhooks may not go."""


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), which is what gets reached."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast: no loopback, private, CGNAT (100.64/10), documentation, multicast..."""
    if address.is_multicast or not address.is_global:
        return False
    inner = _embedded_ipv4(address)
    return inner is None or is_public(inner)


def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookURLError(f"cannot resolve webhook host {host!r}: {exc}") from exc
    out: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


@dataclass(frozen=True)
class Target:
    """Where one delivery attempt goes: the URL's parts plus the checked address to connect to."""

    scheme: str
    host: str  # as written in the URL: the Host header and the TLS server name
    port: int
    path: str  # path plus query
    # The checked address to connect to; None when a proxy resolves the host (`proxied_webhook`).
    address: IPAddress | None


def _split(url: str) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise WebhookURLError(f"webhook URL must be http or https, got {url!r}")
    if not parts.hostname:
        raise WebhookURLError(f"webhook URL has no host: {url!r}")
    if parts.username or parts.password:
        raise WebhookURLError("webhook URL must not carry credentials; use the signing secret")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookURLError(f"webhook URL has a bad port: {url!r}") from exc
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, path


def _check(host: str, addresses: list[IPAddress], allow_private: bool) -> None:
    if allow_private:
        return
    blocked = sorted({str(a) for a in addresses if not is_public(a)})
    if blocked:
        raise WebhookURLError(f"webhook host {host!r} resolves to non-public address(es) {', '.join(blocked)}; "
                              "set deliver.allow_private_networks to allow internal receivers")


def _loopback_name(host: str) -> bool:
    return host.lower() == "localhost" or host.lower().endswith(".localhost")


def resolve_webhook(url: str, allow_private: bool = False, resolver: Resolver = resolve) -> Target:
    """Resolve once, check every address, and return the first one to connect to."""
    scheme, host, port, path = _split(url)
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        if _loopback_name(host) and not allow_private:
            raise WebhookURLError(f"webhook host {host!r} is loopback; set deliver.allow_private_networks "
                                  "to allow internal receivers") from None
        addresses = resolver(host, port)
        if not addresses:
            raise WebhookURLError(f"webhook host {host!r} resolves to no address") from None
    _check(host, addresses, allow_private)
    return Target(scheme, host, port, path, addresses[0])


def proxied_webhook(url: str, allow_private: bool = False) -> Target:
    """A webhook reached through an HTTP proxy: the proxy resolves the host, not this process (which
    often cannot: that is why there is a proxy). What the URL itself shows is still checked (a
    non-public IP literal, a loopback name); where a name leads is the proxy's policy."""
    scheme, host, port, path = _split(url)
    try:
        address: IPAddress = ipaddress.ip_address(host)
    except ValueError:
        if _loopback_name(host) and not allow_private:
            raise WebhookURLError(f"webhook host {host!r} is loopback; set deliver.allow_private_networks "
                                  "to allow internal receivers") from None
        return Target(scheme, host, port, path, None)
    _check(host, [address], allow_private)
    return Target(scheme, host, port, path, address)


def validate_webhook_url(url: str, allow_private: bool = False, check_dns: bool = True,
                         resolver: Resolver = resolve) -> str:
    """Return ``url`` if acceptable, else raise WebhookURLError saying why."""
    _, host, port, _ = _split(url)
    if allow_private:
        return url
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(host)]
    except ValueError:
        if _loopback_name(host):
            raise WebhookURLError(f"webhook host {host!r} is loopback; set deliver.allow_private_networks "
                                  "to allow internal receivers") from None
        if not check_dns:
            return url
        addresses = resolver(host, port)
    _check(host, addresses, allow_private)
    return url
