"""Serve the app with waitress inside this process: ``serve(settings)``.

waitress reads every request — its request line, headers and body — asynchronously in one I/O thread and hands it
to one of ``TAXOMOCO_HTTP_THREADS`` application threads only once it is complete (large bodies are spooled to a
temporary file). A client that trickles its request never holds an application thread, so /health keeps answering
with any number of slow clients connected (up to :data:`CONNECTION_LIMIT`). waitress also passes the app's HTTP
reason phrase through unchanged: Label Studio shows the user only that phrase of a failed /setup, and the backend
puts the cause and the fix there.

Body limits are applied by waitress itself, per path, as soon as the request's headers are read — before any body is
buffered: ``MAX_REQUEST_BYTES`` for /predict and /similar, ``SMALL_REQUEST_MAX_BYTES`` for every other path and for
every request that lacks the Basic auth a path needs (an unauthenticated caller cannot make the server spool a large
body to disk). A larger ``Content-Length`` is answered 413 at once; a chunked body is cut when it passes the limit.

Every response leaves in one TCP segment when it fits (:class:`OneSegmentTask`): waitress writes a response's header
and its body in two ``send`` calls, each pushed at once (``TCP_NODELAY``), so the client was woken twice; on a loaded
machine the first wake-up hands it the core, and the rest of the answer waited for the next turn of the serving thread
(measured: /predict's write wall time 3.5 ms for 0.1 ms of CPU, ``bench/predict_latency.py``).

One process serves; to serve more requests run more backend processes (containers) behind a load balancer, all on
one ``MODEL_DIR`` and ``REDIS_URL`` (the model store hot-reloads what any trainer publishes).
"""

from __future__ import annotations

import copy
import logging
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import create_server
from waitress.task import ErrorTask, WSGITask

from ml_backend.http.app import LARGE_BODY_PATHS, create_app
from ml_backend.http.auth import decide
from ml_backend.settings import Settings

__all__ = ["CHANNEL_TIMEOUT_S", "CONNECTION_LIMIT", "SWITCH_INTERVAL_S", "OneSegmentTask", "build_server",
           "limited_channel", "serve"]

log = logging.getLogger(__name__)

CONNECTION_LIMIT = 1000
"""Open connections served at once (slow ones included); more wait in the listen backlog."""

CHANNEL_TIMEOUT_S = 300
"""A connection that sends nothing for this long is closed (Label Studio's /predict timeout is 100 s)."""

SWITCH_INTERVAL_S = 0.001
"""Python's GIL switch interval (default 5 ms): a short request such as /health waiting for the GIL behind busy
/predict threads gets it sooner."""


TCP_CORK = getattr(socket, "TCP_CORK", None)
"""Linux's option that holds partial segments until it is cleared (None elsewhere: responses go out as before)."""


@contextmanager
def _corked(sock: socket.socket) -> Iterator[None]:
    """Hold ``sock``'s partial TCP segments while the block writes, push them when it ends (however it ends)."""
    if TCP_CORK is None:
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 1)
    except OSError:  # closed by the client meanwhile, or not TCP: write as waitress does
        yield
        return
    try:
        yield
    finally:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_CORK, 0)  # sends what is held
        except OSError:
            pass  # the connection is gone: nothing left to send


class OneSegmentTask(WSGITask):
    """waitress's WSGI task with the socket corked while it writes: the header and the body of a response that fits
    in one segment reach the client together, and the client is woken once (full segments of a larger response go
    out as they fill)."""

    def service(self) -> None:
        with _corked(self.channel.socket):
            super().service()


class OneSegmentErrorTask(ErrorTask):
    """waitress's error answer (400, 413, ...), written the same way."""

    def service(self) -> None:
        with _corked(self.channel.socket):
            super().service()


def limited_channel(settings: Settings, adj: Adjustments) -> type[HTTPChannel]:
    """A waitress channel class whose requests get their body limit from their path and their Basic auth, decided
    when the headers are complete (``adj`` carries the large limit)."""
    small = copy.copy(adj)
    small.max_request_body_size = settings.small_request_max_bytes + 1  # waitress refuses >= the limit

    class PathLimitedParser(HTTPRequestParser):
        def parse_header(self, header_plus: bytes) -> None:
            super().parse_header(header_plus)
            authorization = self.headers.get("AUTHORIZATION")
            if self.path not in LARGE_BODY_PATHS or not decide(self.path, authorization, settings).allowed:
                self.adj = small  # read by waitress for this request's body from here on

    class PathLimitedChannel(HTTPChannel):
        parser_class = PathLimitedParser
        task_class = OneSegmentTask
        error_task_class = OneSegmentErrorTask

    return PathLimitedChannel


def build_server(settings: Settings, app_factory: Callable[[Settings], Any] | None = None) -> Any:
    """The waitress server for ``settings`` (bound, not yet running)."""
    app = app_factory(settings) if app_factory is not None else create_app(settings)
    server = create_server(
        app, host=settings.host, port=settings.port, threads=settings.http_threads, ident="taxomoco",
        connection_limit=CONNECTION_LIMIT, channel_timeout=CHANNEL_TIMEOUT_S, asyncore_use_poll=True,
        max_request_body_size=max(settings.max_request_bytes, settings.small_request_max_bytes) + 1,
        clear_untrusted_proxy_headers=True,
    )
    # one listening socket (TcpWSGIServer), or several (MultiSocketServer: its map holds them)
    listeners = [server] if hasattr(server, "channel_class") else \
        [s for s in server.map.values() if hasattr(s, "channel_class")]
    for listener in listeners:
        listener.channel_class = limited_channel(settings, listener.adj)
    return server


def serve(settings: Settings, app_factory: Callable[[Settings], Any] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; blocks.

    Args:
        settings: the process settings.
        app_factory: builds the WSGI app; default ``create_app(settings)``.
    """
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    server = build_server(settings, app_factory)

    def stop(signum: int, frame: Any) -> None:
        log.info("taxomoco stopping (signal %s)", signum)
        parts = getattr(server.application, "extensions", {}).get("taxomoco", {})
        for part in (parts.get("scheduler"), parts.get("store")):
            if part is not None:
                part.close()  # a running training child is terminated; nothing half-written is published
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("taxomoco serving on http://%s:%s with waitress (%d threads)", settings.host, settings.port,
             settings.http_threads)
    try:
        server.run()
    finally:
        server.close()
        log.info("taxomoco stopped")
