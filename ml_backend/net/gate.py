"""The one gate every outbound HTTP request of the backend passes: images, the Label Studio API, token refreshes,
redirects, label-studio-sdk calls.

For each request (and again for every redirect hop) the gate

1. parses the URL with the parser the HTTP client itself uses (``urllib3.util.parse_url``) and refuses what
   parsers disagree on: backslashes, user-info (``user@host``), control characters and whitespace, schemes other
   than http(s);
2. compares the origin (scheme, host, port) exactly with the origins the request may go to (Label Studio's origin
   for API calls; Label Studio's origin or ``ALLOWED_IMAGE_HOSTS`` for images);
3. resolves the host name and refuses loopback, private, link-local, multicast, reserved and unspecified addresses
   (IPv4-mapped IPv6 included) unless the operator named that origin explicitly (:attr:`Destination.private_ok`);
4. connects to the address it checked (the socket is pinned to that IP: no DNS rebinding between check and use),
   sending the original ``Host`` header and checking TLS certificates against the host name;
5. attaches credentials itself, and only for Label Studio's origin (never over http when Label Studio is https);
   a caller's own ``Authorization`` / ``Cookie`` headers are dropped; a redirect to another origin is followed
   without them.

Error messages name the URL without its query string and never the body of a remote answer.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, Protocol
from urllib.parse import urlencode, urljoin

import certifi
import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import Url, parse_url

from model.errors import ConfigError, DataError

__all__ = [
    "AuthHeaders",
    "Destination",
    "GateRefused",
    "GateResponse",
    "GateUnreachable",
    "Origin",
    "OutboundGate",
    "safe_url",
]

log = logging.getLogger(__name__)

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
_DROPPED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "host"})

Resolver = Callable[[str, int], list[str]]


class GateRefused(DataError):
    """The gate refused a URL (its message names the URL and the remedy)."""


class GateUnreachable(DataError):
    """No HTTP answer came (refused, timed out, name not found, TLS failure); the message names the URL."""


class AuthHeaders(Protocol):
    """Gives the headers that authenticate to Label Studio (``ml_backend.labelstudio.auth``)."""

    def headers(self) -> dict[str, str]: ...


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
        parsed = _parse(url)
        return cls(str(parsed.scheme), str(parsed.host), _port(parsed))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = {"http": 80, "https": 443}[self.scheme]
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")


@dataclass(frozen=True)
class Destination:
    """Where one kind of request may go.

    Attributes:
        origins: exact origins allowed.
        hosts: host names allowed on any port of http or https (``ALLOWED_IMAGE_HOSTS`` entries without a scheme).
        private_ok: origins the operator named explicitly, which may resolve to private or loopback addresses.
        private_hosts_ok: host names (as in ``hosts``) that may resolve to private addresses.
        credentials_for: the one origin credentials are attached for (Label Studio), or None.
        auth: the credentials, asked for on each request to ``credentials_for``.
        private_remedy: what an operator does to allow a private address for this kind of request.
    """

    origins: frozenset[Origin] = frozenset()
    hosts: frozenset[str] = frozenset()
    private_ok: frozenset[Origin] = frozenset()
    private_hosts_ok: frozenset[str] = frozenset()
    credentials_for: Origin | None = None
    auth: AuthHeaders | None = field(default=None, compare=False)
    private_remedy: str = "set LABEL_STUDIO_URL to it"

    def allows(self, origin: Origin) -> bool:
        return origin in self.origins or origin.host in self.hosts

    def private_allowed(self, origin: Origin) -> bool:
        return origin in self.private_ok or origin.host in self.private_hosts_ok


@dataclass
class GateResponse:
    """An answer that came through the gate (body read whole, within the size limit)."""

    status: int
    headers: Message
    url: str
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            DataError: the body is not JSON (its content is not quoted).
        """
        import json

        try:
            return json.loads(self.body)
        except ValueError:
            raise DataError(f"{safe_url(self.url)} answered HTTP {self.status} with a body that is not JSON.") from None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")


def safe_url(url: str) -> str:
    """``url`` without user-info, query string and fragment (for messages and logs)."""
    try:
        parsed = parse_url(url)
    except Exception:  # any unparsable value: show nothing of it
        return "<unparsable URL>"
    return Url(scheme=parsed.scheme, host=parsed.host, port=parsed.port, path=parsed.path).url


def _parse(url: str) -> Url:
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


def _port(parsed: Url) -> int:
    return int(parsed.port or {"http": 80, "https": 443}[str(parsed.scheme)])


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _public(ip: str) -> bool:
    """Whether ``ip`` is a global unicast address (not loopback, private, link-local, shared, reserved, multicast)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return bool(addr.is_global) and not addr.is_multicast


class OutboundGate:
    """Sends HTTP requests only where a :class:`Destination` allows, pinned to checked addresses.

    Thread-safe; connection pools are kept per (checked address, host) and reused.

    Args:
        resolver: ``(host, port) -> [ip, ...]``; default the system resolver.
        max_pools: connection pools kept (least recently used ones are closed).
    """

    def __init__(self, resolver: Resolver | None = None, max_pools: int = 32) -> None:
        self._resolve = resolver or _system_resolver
        self._pools: OrderedDict[tuple[str, str, int, str], urllib3.HTTPConnectionPool] = OrderedDict()
        self._max_pools = max_pools
        self._lock = threading.Lock()

    # ----- checks -------------------------------------------------------------------------------------
    def check(self, url: str, dest: Destination) -> tuple[Url, Origin, str]:
        """``(parsed URL, origin, checked IP)`` of a URL the destination allows.

        Raises:
            GateRefused: the URL, its origin or its address is not allowed (the message says which, and what to do).
            GateUnreachable: the host name does not resolve.
        """
        parsed = _parse(url)
        origin = Origin(str(parsed.scheme), str(parsed.host), _port(parsed))
        if not dest.allows(origin):
            raise GateRefused(
                f"The host {origin} is not allowed ({safe_url(url)}); images may come from Label Studio's own origin "
                "or from hosts in ALLOWED_IMAGE_HOSTS (add it there)."
            )
        try:
            ips = self._resolve(origin.host, origin.port)
        except (OSError, UnicodeError) as exc:
            raise GateUnreachable(
                f"The host {origin.host!r} of {safe_url(url)} does not resolve ({exc.__class__.__name__})."
            ) from None
        if not ips:
            raise GateUnreachable(f"The host {origin.host!r} of {safe_url(url)} has no address.")
        if not dest.private_allowed(origin):
            bad = [ip for ip in ips if not _public(ip)]
            if bad:
                raise GateRefused(
                    f"{safe_url(url)} resolves to the non-public address {bad[0]}; refused. Only an origin the operator "
                    f"configured explicitly may be on a private network: {dest.private_remedy}."
                )
        return parsed, origin, ips[0]

    # ----- requests -----------------------------------------------------------------------------------
    def request(
        self,
        method: str,
        url: str,
        dest: Destination,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        json_body: Any = None,
        timeout: float = 30.0,
        max_bytes: int = 100_000_000,
        deadline_s: float | None = None,
        follow_redirects: bool = True,
    ) -> GateResponse:
        """Send one request (following up to :data:`MAX_REDIRECTS` redirects, each one checked again).

        Args:
            method: HTTP method.
            url: absolute URL.
            dest: where the request (and its redirects) may go, and the credentials for Label Studio.
            params: query parameters appended to ``url``.
            headers: extra headers (``Authorization``, ``Cookie`` and ``Host`` are dropped: the gate sets them).
            body: raw body; ``json_body``: an object sent as JSON instead.
            timeout: connect and per-read timeout in seconds.
            max_bytes: the body is read up to this size; larger answers are refused.
            deadline_s: the whole request (all reads) must end within this many seconds (default ``timeout * 3``).
            follow_redirects: follow 301/302/303/307/308 answers.

        Raises:
            GateRefused: a URL of the way is not allowed, or the answer is too large.
            GateUnreachable: no answer, or the answer did not finish in time.
        """
        if params:
            url = url + ("&" if "?" in url else "?") + urlencode({k: v for k, v in params.items() if v is not None})
        if json_body is not None:
            import json

            body = json.dumps(json_body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        deadline = time.monotonic() + (deadline_s if deadline_s is not None else timeout * 3)
        current, current_method = url, method.upper()
        for _ in range(MAX_REDIRECTS + 1):
            parsed, origin, ip = self.check(current, dest)
            send = {k: v for k, v in (headers or {}).items() if k.lower() not in _DROPPED_HEADERS}
            if dest.credentials_for is not None and dest.auth is not None and origin == dest.credentials_for:
                send.update(dest.auth.headers())
            response = self._send(current_method, parsed, origin, ip, send, body, timeout)
            try:
                if follow_redirects and response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise GateUnreachable(f"{safe_url(current)} answered a redirect without a Location.")
                    current = urljoin(current, location)
                    if response.status == 303 or (response.status in (301, 302) and current_method == "POST"):
                        current_method, body = "GET", None
                    continue
                data = self._read(response, current, max_bytes, deadline)
                message = Message()
                for key, value in response.headers.items():
                    message[key] = value
                return GateResponse(response.status, message, current, data)
            finally:
                response.release_conn()
        raise GateRefused(f"{safe_url(url)} redirected more than {MAX_REDIRECTS} times; store the final URL.")

    def stream_chunks(self, response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        """The chunks of an answer as they arrive (``read1``: a trickling server cannot hold a full-chunk read)."""
        while True:
            chunk = response.read1(CHUNK, decode_content=True)  # type: ignore[union-attr]
            if not chunk:
                return
            yield chunk

    def _read(self, response: urllib3.BaseHTTPResponse, url: str, max_bytes: int, deadline: float) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise GateRefused(f"{safe_url(url)} announces {int(declared)} bytes, over the limit of {max_bytes}.")
        buf = bytearray()
        try:
            for chunk in self.stream_chunks(response):
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise GateRefused(f"{safe_url(url)} sent more than {max_bytes} bytes; download stopped.")
                if time.monotonic() > deadline:
                    raise GateUnreachable(f"{safe_url(url)} took too long to send its answer; download stopped.")
        except (Urllib3Error, OSError) as exc:
            raise GateUnreachable(f"Reading {safe_url(url)} failed ({exc.__class__.__name__}).") from None
        return bytes(buf)

    def _send(self, method: str, parsed: Url, origin: Origin, ip: str, headers: dict[str, str], body: bytes | None,
              timeout: float) -> urllib3.BaseHTTPResponse:
        default = 80 if origin.scheme == "http" else 443
        host_header = (f"[{origin.host}]" if ":" in origin.host else origin.host) + (
            "" if origin.port == default else f":{origin.port}")
        path = parsed.request_uri or "/"
        pool = self._pool(origin, ip)
        try:
            return pool.urlopen(method, path, body=body, headers={**headers, "Host": host_header}, redirect=False,
                                retries=False, preload_content=False, assert_same_host=False,
                                timeout=urllib3.Timeout(connect=timeout, read=timeout))
        except (Urllib3Error, OSError) as exc:
            raise GateUnreachable(f"{safe_url(parsed.url)} did not answer ({exc.__class__.__name__}); check that the "
                                  "host runs and is reachable from this machine.") from None

    def _pool(self, origin: Origin, ip: str) -> urllib3.HTTPConnectionPool:
        key = (ip, origin.host, origin.port, origin.scheme)
        with self._lock:
            pool = self._pools.get(key)
            if pool is not None:
                self._pools.move_to_end(key)
                return pool
            if origin.scheme == "https":
                pool = urllib3.HTTPSConnectionPool(ip, origin.port, maxsize=8, server_hostname=origin.host,
                                                   assert_hostname=origin.host, cert_reqs="CERT_REQUIRED",
                                                   ca_certs=certifi.where())
            else:
                pool = urllib3.HTTPConnectionPool(ip, origin.port, maxsize=8)
            self._pools[key] = pool
            while len(self._pools) > self._max_pools:
                _, old = self._pools.popitem(last=False)
                old.close()
            return pool

    def close(self) -> None:
        """Close every pooled connection."""
        with self._lock:
            for pool in self._pools.values():
                pool.close()
            self._pools.clear()


def require_origin(url: str, what: str) -> Origin:
    """The origin of a configured URL, or a :class:`ConfigError` naming the setting."""
    try:
        return Origin.of(url)
    except GateRefused as exc:
        raise ConfigError(f"{what}={safe_url(url)!r}: {exc}") from None
