"""The scheduler's part of ``/health``: asked in a background thread, answered from a short-lived cache.

Label Studio gives ``/health`` one second. The scheduler's own check (a Redis ping, or a look at the embedded
trainer's thread) may be slow under load, so it runs in one background thread; ``/health`` reuses an answer
younger than :data:`MAX_AGE_S` and otherwise waits at most :data:`TIMEOUT_S` for a new one.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from ml_backend.queue.base import Scheduler

__all__ = ["MAX_AGE_S", "STALE_S", "TIMEOUT_S", "SchedulerHealth"]

TIMEOUT_S = 0.4
"""Longest a /health call waits for the scheduler's own health check."""
MAX_AGE_S = 1.0
"""A scheduler health answer younger than this is reused as is; an older one triggers a new check."""
STALE_S = 5.0
"""An answer older than this is not shown any more: /health waits (within the budget) for a new one."""


class SchedulerHealth:
    """The scheduler's health for ``/health``, never slower than :data:`TIMEOUT_S`.

    Args:
        scheduler: whose ``health()`` is asked.
    """

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="health")
        self._lock = threading.Lock()
        self._future: Future[dict[str, Any]] | None = None
        self._since = 0.0  # when the running check started
        self._last: dict[str, Any] | None = None
        self._last_at: float | None = None  # when the check behind _last started

    def get(self) -> dict[str, Any]:
        """The scheduler's health (``{"ok": bool, ...}``) with ``checked_s_ago``, or why it is unknown."""
        with self._lock:
            now = time.monotonic()
            future = self._future
            if future is not None and future.done():
                try:
                    self._last = dict(future.result())
                except Exception as exc:  # health must always answer
                    self._last = {"ok": False, "reason": f"{exc.__class__.__name__}: {exc}"}
                self._last_at, self._future, future = self._since, None, None
            if future is None and (self._last_at is None or now - self._last_at > MAX_AGE_S):
                self._since = now
                self._future = future = self._pool.submit(self._scheduler.health)
            if self._last is not None and self._last_at is not None and now - self._last_at <= STALE_S:
                return {**self._last, "checked_s_ago": round(now - self._last_at, 3)}
            assert future is not None
            since = self._since
        # no recent answer: wait for the running check, never longer than the budget since it started
        wait = max(0.0, TIMEOUT_S - (time.monotonic() - since))
        try:
            answer = dict(future.result(timeout=wait))
        except FutureTimeout:
            return {"ok": False, "reason": f"the scheduler did not answer within {TIMEOUT_S} s"}
        except Exception as exc:  # health must always answer
            return {"ok": False, "reason": f"{exc.__class__.__name__}: {exc}"}
        with self._lock:
            if self._future is future:
                self._last, self._last_at, self._future = answer, since, None
        return {**answer, "checked_s_ago": round(time.monotonic() - since, 3)}
