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
   sending the original ``Host`` header and checking TLS certificates against the host name
   (``ml_backend.net.pools``);
5. attaches credentials itself, and only for Label Studio's origin (never over http when Label Studio is https);
   a caller's own ``Authorization`` / ``Cookie`` headers are dropped; a redirect to another origin is followed
   without them;
6. bounds the whole request — every hop, status line, headers and body — by one deadline, enforced on the socket
   (``ml_backend.net.deadline``: a remote that trickles its answer is cut), and returns a connection to its pool
   only after a whole answer was read (a redirect's body is read and dropped, or the connection closed).

Error messages name the URL without its query string and never the body of a remote answer.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from email.message import Message
from typing import Any
from urllib.parse import urlencode, urljoin

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.util import Url

from ml_backend.net.deadline import Deadline, Watchdog, guarding
from ml_backend.net.destination import AuthHeaders, Destination, GateResponse, GateUnreachable
from ml_backend.net.pools import PinnedPools
from ml_backend.net.urls import GateRefused, Origin, is_public, parse, port_of, safe_url

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
REDIRECT_BODY_MAX = 64 * 1024
"""A redirect's body up to this size is read and dropped (the connection is reused); a larger one closes it."""
_DROPPED_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization", "host"})

Resolver = Callable[[str, int], list[str]]

_watchdog = Watchdog()


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class OutboundGate:
    """Sends HTTP requests only where a :class:`Destination` allows, pinned to checked addresses.

    Thread-safe; connection pools are kept per (checked address, host) and reused.

    Args:
        resolver: ``(host, port) -> [ip, ...]``; default the system resolver.
        max_pools: connection pools kept (least recently used ones are closed).
    """

    def __init__(self, resolver: Resolver | None = None, max_pools: int = 32) -> None:
        self._resolve = resolver or _system_resolver
        self._pools = PinnedPools(max_pools)

    # ----- checks -------------------------------------------------------------------------------------
    def check(self, url: str, dest: Destination) -> tuple[Url, Origin, str]:
        """``(parsed URL, origin, checked IP)`` of a URL the destination allows.

        Raises:
            GateRefused: the URL, its origin or its address is not allowed (the message says which, and what to do).
            GateUnreachable: the host name does not resolve.
        """
        parsed = parse(url)
        origin = Origin(str(parsed.scheme), str(parsed.host), port_of(parsed))
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
            bad = [ip for ip in ips if not is_public(ip)]
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
            deadline_s: the whole request — connecting, every redirect hop, status line, headers and body — must end
                within this many seconds (default ``timeout * 3``); the socket is cut when it passes.
            follow_redirects: follow 301/302/303/307/308 answers.

        Raises:
            GateRefused: a URL of the way is not allowed, or the answer is too large.
            GateUnreachable: no answer, or the answer did not finish in time.
        """
        if params:
            url = url + ("&" if "?" in url else "?") + urlencode({k: v for k, v in params.items() if v is not None})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers = {**(headers or {}), "Content-Type": "application/json"}
        deadline = Deadline(time.monotonic() + (deadline_s if deadline_s is not None else timeout * 3))
        _watchdog.arm(deadline)
        try:
            return self._follow(method.upper(), url, dest, headers or {}, body, timeout, max_bytes, deadline,
                                follow_redirects)
        finally:
            deadline.cancel()

    def _follow(self, method: str, url: str, dest: Destination, headers: Mapping[str, str], body: bytes | None,
                timeout: float, max_bytes: int, deadline: Deadline, follow_redirects: bool) -> GateResponse:
        """The hops of one request (each checked), all under one deadline."""
        current = url
        hops = renewed = 0
        while hops <= MAX_REDIRECTS:
            parsed, origin, ip = self.check(current, dest)
            send = {k: v for k, v in headers.items() if k.lower() not in _DROPPED_HEADERS}
            credentials = dest.credentials_for is not None and dest.auth is not None and origin == dest.credentials_for
            if credentials:
                send.update(dest.auth.headers())  # type: ignore[union-attr]
            response = self._send(method, parsed, origin, ip, send, body, timeout, deadline)
            reusable = False  # the connection goes back to its pool only after a whole, well-formed answer
            try:
                if response.status == 401 and credentials and not renewed and dest.auth.invalidate(send):  # type: ignore[union-attr]
                    renewed += 1  # an expired or revoked access token: renew it and send the same hop once more
                    reusable = self._discard(response, deadline)
                    continue
                hops += 1
                if follow_redirects and response.status in (301, 302, 303, 307, 308):
                    location = response.headers.get("Location")
                    if not location:
                        raise GateUnreachable(f"{safe_url(current)} answered a redirect without a Location.")
                    reusable = self._discard(response, deadline)
                    current = urljoin(current, location)
                    if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                        method, body = "GET", None
                    continue
                data = self._read(response, current, max_bytes, deadline)
                reusable = True
                message = Message()
                for key, value in response.headers.items():
                    message[key] = value
                return GateResponse(response.status, message, current, data)
            finally:
                self._release(response, reusable, deadline)
        raise GateRefused(f"{safe_url(url)} redirected more than {MAX_REDIRECTS} times; store the final URL.")

    @staticmethod
    def _release(response: urllib3.BaseHTTPResponse, reusable: bool, deadline: Deadline) -> None:
        """Give the connection back to its pool, or close it when its answer was not read whole (an unread body
        would be read as the next request's answer)."""
        if deadline.fired:
            reusable = False
        deadline.detach()  # before the pool may hand the connection to another request
        if not reusable:
            response.close()  # closes the connection too; the pool opens a new one when it needs it
        response.release_conn()

    def _discard(self, response: urllib3.BaseHTTPResponse, deadline: Deadline) -> bool:
        """Read and drop the body of an answer that is not used (a redirect, a refused token) when it is small and
        arrives before the deadline; whether the connection may be reused."""
        try:
            left = REDIRECT_BODY_MAX
            while left > 0:
                chunk = response.read1(min(CHUNK, left + 1), decode_content=False)
                if not chunk:
                    return not deadline.fired
                left -= len(chunk)
        except (Urllib3Error, OSError):
            pass
        return False

    def _read(self, response: urllib3.BaseHTTPResponse, url: str, max_bytes: int, deadline: Deadline) -> bytes:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise GateRefused(f"{safe_url(url)} announces {int(declared)} bytes, over the limit of {max_bytes}.")
        buf = bytearray()
        try:
            while True:
                # read1: whatever has arrived (a trickling server cannot hold a full-chunk read)
                chunk = response.read1(CHUNK, decode_content=True)
                if not chunk:
                    break
                buf.extend(chunk)
                if len(buf) > max_bytes:
                    raise GateRefused(f"{safe_url(url)} sent more than {max_bytes} bytes; download stopped.")
                if deadline.fired or deadline.remaining() <= 0:
                    break
        except (Urllib3Error, OSError) as exc:
            if not deadline.fired:
                raise GateUnreachable(f"Reading {safe_url(url)} failed ({exc.__class__.__name__}).") from None
        if deadline.fired or deadline.remaining() <= 0:
            raise GateUnreachable(f"{safe_url(url)} took too long to send its answer; download stopped.")
        return bytes(buf)

    def _send(self, method: str, parsed: Url, origin: Origin, ip: str, headers: dict[str, str], body: bytes | None,
              timeout: float, deadline: Deadline) -> urllib3.BaseHTTPResponse:
        pool = self._pools.get(origin, ip)
        left = deadline.remaining()
        if left <= 0:
            raise GateUnreachable(f"{safe_url(parsed.url)} was not reached in time (redirects took the whole deadline).")
        try:
            with guarding(deadline):  # a remote trickling its status line or headers is cut at the deadline
                return pool.urlopen(method, parsed.request_uri or "/", body=body,
                                    headers={**headers, "Host": origin.host_header}, redirect=False, retries=False,
                                    preload_content=False, assert_same_host=False,
                                    timeout=urllib3.Timeout(connect=min(timeout, left), read=min(timeout, left)))
        except (Urllib3Error, OSError) as exc:
            if deadline.fired:
                raise GateUnreachable(f"{safe_url(parsed.url)} did not answer in time (no complete status line "
                                      "and headers before the deadline); stopped.") from None
            raise GateUnreachable(f"{safe_url(parsed.url)} did not answer ({exc.__class__.__name__}); check that the "
                                  "host runs and is reachable from this machine.") from None

    def close(self) -> None:
        """Close every pooled connection."""
        self._pools.close()

