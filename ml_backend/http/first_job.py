"""The first job of a newly connected project, scheduled by its verified ``/setup``.

Label Studio calls ``/setup`` when the model is connected (and before every prediction batch). The first verified
``/setup`` of a project that never had a job schedules one (reason ``SETUP``) through the process's scheduler — the
embedded trainer or the RQ queue, with its deterministic job ids — so that before anyone labels, the project's
images are embedded, its labeling order is written and the "label next" tab appears
(``ml_backend.training.coldstart``). The scheduling runs in a background thread: ``/setup`` answers within Label
Studio's 3 s whatever Redis does. Each project is looked at once per process.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ml_backend.settings import Settings
from ml_backend.training.records import JobRecords

__all__ = ["FirstJob", "SETUP_REASON"]

log = logging.getLogger(__name__)

SETUP_REASON = "SETUP"
"""The reason recorded for a job scheduled by a project's first ``/setup``."""


class FirstJob:
    """Schedules one job for each project that is connected but never had a job.

    Args:
        settings: where the projects' job records are.
        scheduler: the process's scheduler (``ml_backend.queue.base.Scheduler``).
    """

    def __init__(self, settings: Settings, scheduler: Any) -> None:
        self.settings, self.scheduler = settings, scheduler
        self._seen: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="first-job")

    def connected(self, project_id: int) -> bool:
        """A verified ``/setup`` of ``project_id``: schedule its first job in the background unless this process
        looked at the project before; returns whether it was handed to the background thread."""
        pid = int(project_id)
        with self._lock:
            if pid in self._seen:
                return False
            self._seen.add(pid)
        self._pool.submit(self._schedule, pid)
        return True

    def _schedule(self, pid: int) -> None:
        try:
            record = JobRecords(self.settings.project(pid)).read()
            if record["last_outcome"] is not None or record["queued_since"] or record["running_since"] or \
                    any(record["counts"].values()):
                return  # trained, skipped or failed before, or a job waits: nothing to start
            result = self.scheduler.schedule(pid, reason=SETUP_REASON)
            log.info("project %s connected: first job %s", pid, result.get("action"))
        except Exception:  # end of a background task: the next webhook or POST /train starts the job instead
            log.exception("project %s: the first job after connecting was not scheduled", pid)

    def wait(self, timeout_s: float = 5.0) -> None:
        """Wait until the background scheduling done so far has finished (tests)."""
        self._pool.submit(lambda: None).result(timeout=timeout_s)
