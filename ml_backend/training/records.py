"""Per-project training job records: what is queued or running, and how the last runs ended.

One JSON file per project, ``ProjectPaths.job_status`` (``jobs/status.json``), shared by every process that touches the
project (the server's scheduler, the embedded training child, RQ workers on other machines through the
shared ``MODEL_DIR`` volume). Every change is a read-modify-write under an exclusive ``flock`` on
``jobs/status.lock`` followed by an atomic ``os.replace``, so readers (``/job_status``, ``/metrics``) never
see half a file and concurrent writers never lose each other's counts.

Record layout (all times are UTC ISO-8601 strings)::

    {
      "project_id": 7,
      "queued_since": "...", "queued_reason": "ANNOTATION_CREATED",   # None when nothing waits
      "running_since": "...", "running_job_id": "taxomoco-train-7",   # None when nothing runs
      "last_success": {"version": "...", "duration_s": 12.3, "finished_at": "...", "result": {...}},
      "last_failure": {"reason": "...", "duration_s": 1.2, "finished_at": "...", "job_id": "..."},
      "last_skip": {"reason": "need 3 more labels", "finished_at": "...", "result": {...}},  # cold-start work
      "last_outcome": "succeeded" | "skipped" | "failed" | None,
      "counts": {"scheduled": 0, "coalesced": 0, "started": 0, "succeeded": 0, "skipped": 0, "failed": 0}
    }
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from enum import Enum
from typing import Any

from ml_backend.paths import ProjectPaths
from model.atomic import atomic_write_text
from model.errors import TaxomocoError

__all__ = ["Counter", "JobOutcome", "JobRecords", "empty_record", "run_recorded", "timed_step", "utc_now"]

log = logging.getLogger(__name__)


class JobOutcome(str, Enum):
    """How a training run ended."""

    SUCCEEDED = "succeeded"  # a new model version was published
    SKIPPED = "skipped"  # nothing to do yet (too few labels); not a failure
    FAILED = "failed"  # an error; the live model stays as it was


class Counter(str, Enum):
    """Keys of the ``counts`` object of a record."""

    SCHEDULED = "scheduled"
    COALESCED = "coalesced"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    SKIPPED = "skipped"
    FAILED = "failed"


def utc_now() -> str:
    """The current time as an ISO-8601 UTC string (what records store)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@contextlib.contextmanager
def timed_step(durations: dict[str, float], step: str) -> Iterator[None]:
    """Time one step of a job into ``durations[step]`` (seconds, the job result's ``durations_s``) and log it."""
    start = time.monotonic()
    log.info("step %s ...", step)
    yield
    durations[step] = round(time.monotonic() - start, 3)
    log.info("step %s done in %.1f s", step, durations[step])


def empty_record(project_id: int) -> dict[str, Any]:
    """The record of a project that never had a job."""
    return {
        "project_id": int(project_id),
        "queued_since": None,
        "queued_reason": None,
        "running_since": None,
        "running_job_id": None,
        "last_success": None,
        "last_failure": None,
        "last_skip": None,
        "last_outcome": None,
        "counts": {c.value: 0 for c in Counter},
    }


class JobRecords:
    """The job record of one project, stored in ``paths.job_status``.

    Args:
        paths: the project's files (``settings.project(pid)``); ``jobs/`` is created on the first write, never
            on read.
    """

    def __init__(self, paths: ProjectPaths) -> None:
        self.project_id = int(paths.project_id)
        self.paths = paths
        self.path = paths.job_status

    def read(self) -> dict[str, Any]:
        """The current record; an empty one when the file does not exist or cannot be parsed."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return empty_record(self.project_id)
        except (OSError, ValueError) as exc:
            log.warning("Job record %s unreadable (%s); reporting an empty record.", self.path, exc)
            return empty_record(self.project_id)
        record = empty_record(self.project_id)
        record.update(data)
        record["counts"] = {**empty_record(self.project_id)["counts"], **data.get("counts", {})}
        return record

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Yield the record for modification under an exclusive file lock; written back atomically."""
        self.paths.jobs.mkdir(parents=True, exist_ok=True)
        with open(self.paths.job_lock, "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                record = self.read()
                yield record
                atomic_write_text(self.path, json.dumps(record, indent=1, sort_keys=True))
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def mark_queued(self, reason: str, coalesced: int = 0) -> None:
        """A job was put in line (``reason``: the event that asked for it); ``coalesced`` events were
        folded into already waiting jobs since the last write."""
        with self._locked() as r:
            r["counts"][Counter.SCHEDULED.value] += 1
            r["counts"][Counter.COALESCED.value] += int(coalesced)
            if r["queued_since"] is None:
                r["queued_since"] = utc_now()
            r["queued_reason"] = reason

    def mark_waiting(self, reason: str) -> None:
        """A job waits (already counted by :meth:`mark_queued`): show it again after the running job's start
        cleared it (the running job defers its after-publish work to it: ``ml_backend.training.tail``)."""
        with self._locked() as r:
            if r["queued_since"] is None:
                r["queued_since"] = utc_now()
                r["queued_reason"] = reason

    def add_coalesced(self, n: int) -> None:
        """Count ``n`` events that were folded into a job already waiting."""
        if n <= 0:
            return
        with self._locked() as r:
            r["counts"][Counter.COALESCED.value] += int(n)

    def clear_queued(self) -> None:
        """Nothing waits any more (the queue was lost, or the job was cancelled)."""
        with self._locked() as r:
            r["queued_since"] = None
            r["queued_reason"] = None

    def mark_started(self, job_id: str) -> None:
        """A job began to run: it is no longer queued."""
        with self._locked() as r:
            r["counts"][Counter.STARTED.value] += 1
            r["running_since"] = utc_now()
            r["running_job_id"] = job_id
            r["queued_since"] = None
            r["queued_reason"] = None

    def mark_finished(
        self,
        outcome: JobOutcome,
        duration_s: float,
        job_id: str | None,
        version: str | None = None,
        reason: str | None = None,
        result: dict[str, Any] | None = None,
    ) -> None:
        """A run ended with ``outcome``.

        Args:
            outcome: how it ended.
            duration_s: wall-clock seconds of the run.
            job_id: the id of the job that ran; None for "whatever is recorded as running" (a run that
                died before it could record its end).
            version: the published model version (SUCCEEDED only).
            reason: why it failed or was skipped.
            result: the job's small result dict (SUCCEEDED, and SKIPPED: the cold-start work), kept for
                ``/job_status``.
        """
        with self._locked() as r:
            if job_id is None or r["running_job_id"] in (None, job_id):
                job_id = job_id or r["running_job_id"]
                r["running_since"] = None
                r["running_job_id"] = None
            r["counts"][outcome.value] += 1
            r["last_outcome"] = outcome.value
            entry: dict[str, Any] = {"finished_at": utc_now(), "duration_s": round(float(duration_s), 3), "job_id": job_id}
            if outcome is JobOutcome.SUCCEEDED:
                r["last_success"] = {**entry, "version": version, "result": result or {}}
            elif outcome is JobOutcome.SKIPPED:
                r["last_skip"] = {**entry, "reason": reason, "result": result or {}}
            else:
                r["last_failure"] = {**entry, "reason": reason}


def run_recorded(records: JobRecords, job_id: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one job and record its start and outcome; the boundary where a job's errors are recorded.

    ``run`` returns a dict whose ``"status"`` is a :class:`JobOutcome` value (default ``succeeded``), with
    ``"version"`` on success and ``"reason"`` when skipped. An exception is recorded as a failure (its
    message is the reason) and re-raised, so that RQ marks the job failed and retries it when it may.

    Args:
        records: the project's job record.
        job_id: the id the run is recorded under.
        run: the work itself.

    Returns:
        ``run``'s dict, with ``"duration_s"`` added.
    """
    records.mark_started(job_id)
    start = time.monotonic()
    try:
        result = dict(run())
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}" if not isinstance(exc, TaxomocoError) else str(exc)
        records.mark_finished(JobOutcome.FAILED, time.monotonic() - start, job_id, reason=reason or type(exc).__name__)
        log.error("Training job %s failed: %s", job_id, reason)
        raise
    duration = time.monotonic() - start
    outcome = JobOutcome(result.get("status", JobOutcome.SUCCEEDED.value))
    result["status"] = outcome.value
    result["duration_s"] = round(duration, 3)
    records.mark_finished(
        outcome, duration, job_id, version=result.get("version"), reason=result.get("reason"), result=result
    )
    log.info("Training job %s %s in %.1f s.", job_id, outcome.value, duration)
    return result
