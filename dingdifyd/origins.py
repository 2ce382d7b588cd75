"""Web origins (scheme, host and port) of URLs: what decides which hosts the daemon itself may fetch from.

Pure; used by the Dify client (its files, its redirects) and by the bridge (which answer images are Dify's).
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> str | None:
    """`scheme://host:port` of an absolute http(s) URL, lower-cased, the port always written; None for
    anything else (relative, other schemes, unparsable). The user part is no part of it: in
    `https://dify.example.com@10.0.0.1/` the host is 10.0.0.1."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{scheme}://{host}:{port or _DEFAULT_PORTS[scheme]}"


def origins_of(urls: Iterable[str | None]) -> frozenset[str]:
    """The origins of the URLs given (None and non-web URLs left out)."""
    return frozenset(origin for url in urls if url for origin in [origin_of(url)] if origin is not None)
