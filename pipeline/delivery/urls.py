"""Webhook URL validation: http(s) only, and no internal addresses unless allowed (SSRF guard).

Checked when a subscription is added and again before each delivery, since a name can resolve
to a different address later.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class WebhookURLError(ValueError):
    """The URL is malformed or points where webhooks may not go."""


def _internal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (address.is_loopback or address.is_private or address.is_link_local or address.is_reserved
            or address.is_multicast or address.is_unspecified)


def resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise WebhookURLError(f"cannot resolve webhook host {host!r}: {exc}") from exc
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def validate_webhook_url(url: str, allow_private: bool = False, check_dns: bool = True) -> str:
    """Return ``url`` if acceptable, else raise WebhookURLError saying why."""
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
    if allow_private:
        return url
    host = parts.hostname
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        if host.lower() == "localhost" or host.lower().endswith(".localhost"):
            raise WebhookURLError(f"webhook host {host!r} is loopback; set deliver.allow_private_networks "
                                  "to allow internal receivers") from None
        if not check_dns:
            return url
        addresses = resolve(host, port)
    blocked = sorted({str(a) for a in addresses if _internal(a)})
    if blocked:
        raise WebhookURLError(f"webhook host {host!r} resolves to internal address(es) {', '.join(blocked)}; "
                              "set deliver.allow_private_networks to allow internal receivers")
    return url
