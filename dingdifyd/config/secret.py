"""Secrets: a value that never shows itself, and URLs with their credentials masked.

A `Secret`'s `str()` and `repr()` never reveal it; a sealed one (what the supervisor keeps) does not even hold
it (config.loader: `sealed`, `unseal_bot`). `redact_url` masks what a store URL may carry (a password in its user
part or its query), for output and logs.
"""

from __future__ import annotations

import hmac
import re
import secrets
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

# Secrets are compared (a reload restarts a bot whose secret changed) by a keyed digest, never by value: the
# key is drawn once per supervisor, and its bot processes inherit it, so they compare the same way.
_DIGEST_KEY = secrets.token_bytes(32)


class SealedSecretError(RuntimeError):
    """A sealed secret's value was asked for: only the bot process that owns it loads it (`unseal_bot`)."""


class Secret:
    """A secret string. `str()` and `repr()` never reveal it; `reveal()` does, for the one place that sends it.

    A sealed secret knows where it comes from and a digest of it, not its value: the supervisor holds only
    sealed ones, so that no bot process (they are forked from it) inherits another bot's secrets."""

    __slots__ = ("_digest", "_value", "source")

    def __init__(self, value: str | None, source: str = "inline", *, digest: bytes | None = None):
        self._value = value
        self.source = source
        if digest is None:
            digest = hmac.new(_DIGEST_KEY, (value or "").encode("utf-8", "surrogatepass"), "sha256").digest()
        self._digest = digest

    def reveal(self) -> str:
        if self._value is None:
            raise SealedSecretError(f"a sealed secret ({self.source}) has no value here")
        return self._value

    def sealed(self) -> Secret:
        return Secret(None, self.source, digest=self._digest)

    @property
    def is_sealed(self) -> bool:
        return self._value is None

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(other._digest, self._digest)

    def __hash__(self) -> int:
        return hash(self._digest)


# Query parameters that carry a credential: redis-py reads `password` (the usual form for unix:// sockets) and
# `ssl_password` (the TLS key's passphrase) from the URL; anything named like a secret is treated alike.
_SECRET_PARAMETER = re.compile(r"pass|secret|token|credential", re.IGNORECASE)


def redact_url(url: str) -> str:
    """A URL without its credentials, for output and logs: the password of the user part
    (`redis://:secret@host` -> `redis://:***@host`) and every credential in the query
    (`unix:///run/redis.sock?password=secret` -> `...?password=***`). A URL that cannot be parsed shows
    nothing but its scheme."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a malformed host part, as redis-py's parser would
    except ValueError:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://***" if scheme.isalnum() else "***"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    query = "&".join(_redact_parameter(item) for item in parts.query.split("&")) if parts.query else ""
    # put together by hand: urlunsplit drops the empty host of unix:///path
    text = f"{parts.scheme}://{netloc}{parts.path}" if "://" in url else f"{parts.scheme}:{parts.path}"
    return text + (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")


def _redact_parameter(item: str) -> str:
    name, equals, _ = item.partition("=")
    return f"{name}=***" if equals and _SECRET_PARAMETER.search(unquote_plus(name)) else item


def url_secrets(url: str) -> list[str]:
    """The credentials written in a URL (as given and decoded), for the log redaction of the process using it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return []
    found = [parts.password] if parts.password else []
    found += [value for name, value in parse_qsl(parts.query) if _SECRET_PARAMETER.search(name)]
    return [*found, *(unquote(value) for value in found)]
