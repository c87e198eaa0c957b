"""A total deadline for one outbound request, enforced on the socket.

A socket timeout bounds each read, not the whole answer: a remote that sends its status line, its headers or its
body one byte at a time, each within the read timeout, would hold a request (and the thread waiting on it) for as
long as it likes. The gate therefore arms a :class:`Deadline` for every request; when it passes, the one
:class:`Watchdog` thread shuts the request's socket down, so the blocked read returns at once and the gate reports
the request as too slow. The guarded connection classes (:class:`GuardedHTTPConnection`,
:class:`GuardedHTTPSConnection`) register themselves with the deadline of the request they send (a thread-local set
by the gate around the call into urllib3, see :func:`guarding`).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from urllib3.connection import HTTPConnection, HTTPSConnection

__all__ = ["Deadline", "GuardedHTTPConnection", "GuardedHTTPSConnection", "Watchdog", "guarding"]


class Deadline:
    """The moment a request must be over by; shuts the guarded connection's socket down when it passes.

    Args:
        at: ``time.monotonic()`` value of the deadline.
    """

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.cancelled = False
        self._conn: HTTPConnection | None = None
        self._lock = threading.Lock()

    def remaining(self) -> float:
        """Seconds left (0 when passed)."""
        return max(0.0, self.at - time.monotonic())

    def guard(self, conn: HTTPConnection) -> None:
        """Watch ``conn`` (the connection now sending this request)."""
        with self._lock:
            self._conn = conn
            if self.fired:
                _shutdown(conn)

    def detach(self) -> None:
        """This hop's connection goes back to its pool (another request may take it): stop watching it; the
        deadline still applies to the request's next hop."""
        with self._lock:
            self._conn = None

    def cancel(self) -> None:
        """The request is over: never touch its connection again (call before the connection goes back to its
        pool, where another request may take it)."""
        with self._lock:
            self.cancelled = True
            self._conn = None

    def fire(self) -> None:
        """Mark the deadline passed and cut the guarded connection (unless the request was over)."""
        with self._lock:
            if self.cancelled:
                return
            self.fired = True
            if self._conn is not None:
                _shutdown(self._conn)


def _shutdown(conn: HTTPConnection) -> None:
    sock = getattr(conn, "sock", None)
    if sock is None:
        return  # still connecting: the connect timeout bounds that
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class Watchdog:
    """One daemon thread that fires armed deadlines when they pass (restarted after a fork)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._compact_at = 1024

    def arm(self, deadline: Deadline) -> None:
        """Fire ``deadline`` when it passes (nothing happens if it was cancelled by then)."""
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._seq), deadline))
            if len(self._heap) >= self._compact_at:  # requests that ended in time: drop them (amortised O(1))
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._compact_at = max(1024, 2 * len(self._heap))
            if self._thread is None or not self._thread.is_alive():  # first use, or a forked child
                self._thread = threading.Thread(target=self._run, name="gate-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()

    def pending(self) -> int:
        """Deadlines armed and not yet passed (cancelled ones included until their time)."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2].cancelled:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                deadline = heapq.heappop(self._heap)[2]
            deadline.fire()


_current = threading.local()


@contextmanager
def guarding(deadline: Deadline) -> Iterator[None]:
    """While inside, a guarded connection that sends a request in this thread registers with ``deadline``."""
    _current.deadline = deadline
    try:
        yield
    finally:
        _current.deadline = None


class _Guarded:
    def request(self, *args: Any, **kwargs: Any) -> None:
        deadline: Deadline | None = getattr(_current, "deadline", None)
        if deadline is not None:
            deadline.guard(self)  # type: ignore[arg-type]
        super().request(*args, **kwargs)  # type: ignore[misc]


class GuardedHTTPConnection(_Guarded, HTTPConnection):
    """urllib3's HTTP connection, cut by the deadline of the request it sends."""


class GuardedHTTPSConnection(_Guarded, HTTPSConnection):
    """urllib3's HTTPS connection, cut by the deadline of the request it sends."""
