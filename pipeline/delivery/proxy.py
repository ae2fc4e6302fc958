"""Which HTTP proxy a webhook goes through, as a plant's other tools would decide it.

``deliver.webhook_proxy`` when set (``direct``: none), else the environment: ``https_proxy`` /
``HTTPS_PROXY`` for https URLs, ``http_proxy`` / ``HTTP_PROXY`` for http ones (lower case first,
as curl and Python do). Hosts in ``deliver.webhook_no_proxy``, else in ``no_proxy`` / ``NO_PROXY``,
are reached directly: ``*``, a name (covering its subdomains; a leading ``.`` or ``*.`` changes
nothing), an IP address or a CIDR block, each with an optional ``:port``. Proxies are
``http://[user:password@]host[:port]`` (port 80 when left out); the credentials become a Basic
``Proxy-Authorization`` and are never shown.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

DIRECT = "direct"


class ProxyConfigError(ValueError):
    """A proxy setting or variable that cannot be used; the message names it."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    # The Proxy-Authorization header value, from the proxy URL's credentials.
    authorization: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"  # never the credentials


def parse_proxy(value: str, source: str) -> Proxy:
    """A proxy URL (``host:port`` alone means http://); ``source`` names the setting in errors ("":
    the caller's error already names it)."""
    where = f"{source}: " if source else ""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ProxyConfigError(f"{where}only http:// proxies are supported (an https target is tunnelled "
                               f"with CONNECT through them), got {parts.scheme}://")
    try:
        port = parts.port or 80
    except ValueError:
        raise ProxyConfigError(f"{where}bad proxy port in {_masked(text)!r}") from None
    if not parts.hostname:
        raise ProxyConfigError(f"{where}no proxy host in {_masked(text)!r}")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return Proxy(parts.hostname, port, authorization)


def _masked(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url)


def no_proxy_entries(value: str) -> list[str]:
    return [e for e in value.replace(",", " ").split() if e]


def _entry_port(entry: str) -> tuple[str, int | None]:
    """(host part, port or None) of a no-proxy entry: ``host:port``, ``[v6]:port``, bare IPv6, CIDR."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        return host, int(port) if port.isdigit() else None
    return entry, None


def bypasses(host: str, port: int, entries: list[str]) -> bool:
    """Whether ``host``:``port`` is reached without the proxy under these no-proxy entries."""
    host = host.lower().rstrip(".").strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in entries:
        entry = raw.strip().lower()
        if entry == "*":
            return True
        name, entry_port = _entry_port(entry)
        if entry_port is not None and entry_port != port:
            continue
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass  # a name: it never matches an address written as one
            continue
        name = name.lstrip("*").lstrip(".").rstrip(".")
        if name and (host == name or host.endswith("." + name)):
            return True
    return False


class WebhookProxies:
    """The proxy for each webhook URL, decided from the settings and the environment read once.

    A variable that cannot be used raises `ProxyConfigError` when a URL would use it, so a bad
    ``HTTPS_PROXY`` fails those deliveries loudly instead of sending them around the proxy.
    """

    def __init__(self, proxy: str | None = None, no_proxy: list[str] | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._proxies: dict[str, Proxy | ProxyConfigError | None] = {}
        for scheme in ("http", "https"):
            if proxy is not None:
                value, source = proxy, "deliver.webhook_proxy"
            else:
                name = next((n for n in (f"{scheme}_proxy", f"{scheme.upper()}_PROXY") if env.get(n)), None)
                value, source = (env[name], name) if name else ("", "")
            if not value.strip() or value.strip().lower() == DIRECT:
                self._proxies[scheme] = None
                continue
            try:
                self._proxies[scheme] = parse_proxy(value, source)
            except ProxyConfigError as exc:
                self._proxies[scheme] = exc
        if no_proxy is not None:
            self.no_proxy = [e for item in no_proxy for e in no_proxy_entries(item)]
        else:
            self.no_proxy = no_proxy_entries(env.get("no_proxy") or env.get("NO_PROXY") or "")

    def for_url(self, url: str) -> Proxy | None:
        """The proxy ``url`` goes through, or None (direct). A malformed URL gets None: the URL check
        that follows says what is wrong with it."""
        try:
            parts = urlsplit(url)
            scheme = parts.scheme.lower()
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return None
        proxy = self._proxies.get(scheme)
        if proxy is None or not parts.hostname or bypasses(parts.hostname, port, self.no_proxy):
            return None
        if isinstance(proxy, ProxyConfigError):
            raise proxy
        return proxy
