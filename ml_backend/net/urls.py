"""URLs as the outbound gate reads them: parsed with the parser the HTTP client uses (``urllib3.util.parse_url``),
refused where parsers disagree, reduced to an :class:`Origin`; addresses classified public or not; URLs made safe
for messages."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from urllib3.util import Url, parse_url

from model.errors import DataError

__all__ = ["GateRefused", "Origin", "is_public", "parse", "port_of", "safe_url"]


class GateRefused(DataError):
    """The gate refused a URL (its message names the URL and the remedy)."""


def safe_url(url: str) -> str:
    """``url`` without user-info, query string and fragment (for messages and logs)."""
    try:
        parsed = parse_url(url)
    except Exception:  # any unparsable value: show nothing of it
        return "<unparsable URL>"
    return Url(scheme=parsed.scheme, host=parsed.host, port=parsed.port, path=parsed.path).url


def parse(url: str) -> Url:
    """``url`` parsed as urllib3 will send it, scheme and host lower case (IPv6 without brackets).

    Raises:
        GateRefused: backslashes, whitespace or control characters, user-info, a scheme other than http(s), or no host.
    """
    if not isinstance(url, str) or not url:
        raise GateRefused(f"{url!r} is not a URL.")
    if "\\" in url or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise GateRefused(f"The URL {safe_url(url)!r} holds a backslash, a space or a control character; refused "
                          "(HTTP clients disagree on where such a host ends). Store a plain URL in the task.")
    try:
        parsed = parse_url(url)
    except Exception:  # urllib3's LocationParseError and friends: one message for all
        raise GateRefused(f"The URL {safe_url(url)!r} cannot be parsed; store a plain http(s) URL.") from None
    if (parsed.scheme or "").lower() not in ("http", "https"):
        raise GateRefused(f"The URL {safe_url(url)!r} is not http(s); only http and https are fetched.")
    if parsed.auth is not None or "@" in (parsed.netloc or ""):
        raise GateRefused(f"The URL {safe_url(url)!r} holds user-info (user@host); refused. Give credentials through "
                          "the backend's settings, never in a URL.")
    if not parsed.host:
        raise GateRefused(f"The URL {safe_url(url)!r} names no host.")
    return parsed._replace(scheme=str(parsed.scheme).lower(), host=parsed.host.strip("[]").lower().rstrip("."))


def port_of(parsed: Url) -> int:
    """The port of a parsed http(s) URL (80 / 443 when it names none)."""
    return int(parsed.port or {"http": 80, "https": 443}[str(parsed.scheme)])


@dataclass(frozen=True)
class Origin:
    """Scheme, host (lower case, IPv6 without brackets) and port of a URL."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        """The origin of ``url`` (checked like a request URL).

        Raises:
            GateRefused: the URL is not a plain http(s) URL.
        """
        parsed = parse(url)
        return cls(str(parsed.scheme), str(parsed.host), port_of(parsed))

    @property
    def host_header(self) -> str:
        """The ``Host`` header of a request to this origin."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return host + ("" if self.port == default else f":{self.port}")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}"


def is_public(ip: str) -> bool:
    """Whether ``ip`` is a global unicast address (not loopback, private, link-local, shared, reserved, multicast)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return bool(addr.is_global) and not addr.is_multicast

