"""The RQ scheduler: training jobs in Redis queues, run by ``taxomoco worker`` processes (GPU machines).

Each project has two deterministic job ids, ``taxomoco-train-<pid>`` and ``taxomoco-train-<pid>-next``
(two *slots*). Under a short per-project Redis lock, :meth:`RQScheduler.schedule`:

* does nothing when a slot's job waits (queued / scheduled / deferred): the waiting job pulls every
  annotation from Label Studio when it starts, this event's included (**coalesced**);
* enqueues the free slot when the other slot's job runs (**follow-up**), so an event that arrives
  mid-run is not lost;
* else enqueues the first slot (**queued**).

So a project has at most one queued and one running job. A finished or failed job under a slot id is
deleted before the id is used again (its outcome is kept in the project's job record).

Routing: a project that was never pretrained (no ``jobs/pretrain.json``) or a forced pretraining goes to
``settings.pretrain_queue``, everything else to ``settings.heads_queue``. The job decides the pretraining
policy itself from the real image counts, so a heads-queue job may still pretrain when the project grew.

Failures: every job carries ``Retry(max=settings.job_retries)``. A job whose work-horse is SIGKILLed is
retried at once by its worker (rq marks it failed and requeues it while retries are left); a job whose whole
worker died stays STARTED until its execution heartbeat expires (job-monitoring interval + 60 s) and the next
registry maintenance of any worker on that queue (at start-up, then every ``maintenance_interval``) retries
it (``StartedJobRegistry.cleanup``; ``AbandonedJobError``). Redis down: ``schedule`` answers within the short
socket timeouts with ``action == "error"`` and :meth:`health` reports ``ok: False``; nothing is queued, and
the next event after Redis is back trains on all annotations (Label Studio is the source of truth).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import LockError, RedisError
from redis.retry import Retry as RedisRetry
from rq import Callback, Queue, Retry, Worker
from rq.exceptions import AbandonedJobError
from rq.job import Job, JobStatus

from ml_backend.paths import ProjectPaths
from ml_backend.queue.base import DEFAULT_JOB_FUNC, ScheduleAction, Scheduler
from ml_backend.settings import Settings
from ml_backend.training.policy import pretrain_requested, read_pretrain_record, request_pretrain
from ml_backend.training.records import JobOutcome, JobRecords

__all__ = [
    "FAILURE_TTL_S",
    "RESULT_TTL_S",
    "RQScheduler",
    "WAITING",
    "coalesced_key",
    "connect",
    "job_ids",
    "on_job_failure",
    "record_lost_run",
]

log = logging.getLogger(__name__)

WAITING = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.CREATED})
"""Statuses of a job that has not started: a new event is folded into it."""

RESULT_TTL_S = 24 * 3600
FAILURE_TTL_S = 7 * 24 * 3600


def job_ids(project_id: int) -> tuple[str, str]:
    """The two deterministic job ids (slots) of a project."""
    return f"taxomoco-train-{int(project_id)}", f"taxomoco-train-{int(project_id)}-next"


def coalesced_key(project_id: int) -> str:
    """Redis key counting events folded into waiting jobs (kept in Redis: schedule writes no file then)."""
    return f"taxomoco:coalesced:{int(project_id)}"


def connect(url: str, connect_timeout_s: float = 0.5, socket_timeout_s: float = 1.0) -> redis.Redis:
    """A Redis client that fails fast: short timeouts and no client-side retries (for the web process)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=RedisRetry(NoBackoff(), 0),
        retry_on_timeout=False,
    )


class RQScheduler(Scheduler):
    """Enqueues :func:`ml_backend.training.jobs.train_project` on RQ queues with per-project coalescing.

    Args:
        settings: process settings (``redis_url``, queue names, ``job_timeout_s``, ``job_retries``).
        job_func: dotted path of the job function (importable by the workers).
        connect_timeout_s: Redis connect timeout of ``schedule``/``status``/``health``.
        socket_timeout_s: Redis read timeout.
    """

    kind = "rq"

    def __init__(
        self,
        settings: Settings,
        job_func: str = DEFAULT_JOB_FUNC,
        connect_timeout_s: float = 0.5,
        socket_timeout_s: float = 1.0,
    ) -> None:
        assert settings.redis_url, "RQScheduler needs settings.redis_url"
        self.settings = settings
        self.job_func = job_func
        self.redis = connect(settings.redis_url, connect_timeout_s, socket_timeout_s)
        self.queues = {
            name: Queue(name, connection=self.redis) for name in (settings.pretrain_queue, settings.heads_queue)
        }
        self._last_error: tuple[float, str] | None = None

    # --- scheduling ------------------------------------------------------------------------------------
    def queue_for(self, project_id: int, force_pretrain: bool) -> str:
        """The queue a job of this project goes to (cheap: small file reads)."""
        paths = self.settings.project(project_id)
        if force_pretrain or pretrain_requested(paths):
            return self.settings.pretrain_queue
        if read_pretrain_record(paths) is None and not self._too_small_to_pretrain(paths):
            return self.settings.pretrain_queue
        return self.settings.heads_queue

    def _too_small_to_pretrain(self, paths: ProjectPaths) -> bool:
        """Whether the project's last training (or cold-start run, ``ml_backend.training.coldstart``) found it below
        PRETRAIN_MIN_IMAGES (its runs are heads-only; one that has grown past it meanwhile pretrains once on the
        heads queue)."""
        record = JobRecords(paths).read()
        success = (record.get("last_success") or {}).get("result") or {}
        skip = (record.get("last_skip") or {}).get("result") or {}
        decision = success.get("pretrain") or ((skip.get("cold_start") or {}).get("pretrain")) or {}
        n_images = decision.get("n_images")
        return isinstance(n_images, int) and n_images < self.settings.pretrain_min_images

    def schedule(self, project_id: int, reason: str, force_pretrain: bool = False) -> dict[str, Any]:
        pid = int(project_id)
        out: dict[str, Any] = {"project_id": pid, "scheduler": self.kind, "reason": reason}
        if force_pretrain:
            try:
                request_pretrain(self.settings.project(pid))  # also reaches a job that already waits
            except OSError as exc:
                log.warning("Project %s: pretraining request not written (%s).", pid, exc)
        try:
            waiting = self._waiting_job(pid)  # fast path of a burst: fold into the waiting job, no lock
            if waiting is not None:
                out.update(action=ScheduleAction.COALESCED.value, job_id=waiting)
            else:
                with self.redis.lock(f"taxomoco:schedule-lock:{pid}", timeout=10, blocking_timeout=2):
                    out.update(self._schedule_locked(pid, reason, force_pretrain))
        except (RedisError, LockError) as exc:
            message = f"Redis at {self.settings.redis_url} unreachable ({type(exc).__name__}: {exc}); " \
                      "nothing queued: the next event after Redis is back trains on all annotations"
            self._last_error = (time.time(), message)
            log.error("Project %s: cannot queue training: %s", pid, message)
            out.update(action=ScheduleAction.ERROR.value, reason=message)
            return out
        if out["action"] not in (ScheduleAction.COALESCED.value, ScheduleAction.DROPPED.value):
            try:
                JobRecords(self.settings.project(pid)).mark_queued(reason)
            except OSError as exc:  # the job is queued; only its record could not be written
                log.warning("Project %s: job record not written (%s).", pid, exc)
        return out

    def _waiting_job(self, pid: int) -> str | None:
        """The id of the project's job that waits, counting this event as folded into it; else None.

        Safe without the lock: a job seen waiting has not pulled annotations yet, so it sees this event's.
        """
        with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids(pid):
                pipe.hget(Job.key_for(job_id), "status")
            statuses = pipe.execute()
        for job_id, status in zip(job_ids(pid), statuses):
            if status is not None and JobStatus(status.decode()) in WAITING:
                self.redis.incr(coalesced_key(pid))
                return job_id
        return None

    def _schedule_locked(self, pid: int, reason: str, force_pretrain: bool) -> dict[str, Any]:
        ids = job_ids(pid)
        jobs = Job.fetch_many(list(ids), connection=self.redis)
        statuses = [job.get_status(refresh=False) if job is not None else None for job in jobs]
        for job_id, status in zip(ids, statuses):
            if status in WAITING:
                self.redis.incr(coalesced_key(pid))
                return {"action": ScheduleAction.COALESCED.value, "job_id": job_id}
        running = [i for i, status in enumerate(statuses) if status == JobStatus.STARTED]
        if len(running) == 2:
            # Both slots STARTED: one is an abandoned run not yet cleaned up by a worker's maintenance and
            # the other started after this event's annotation was saved; the cleanup retries the first.
            self.redis.incr(coalesced_key(pid))
            return {"action": ScheduleAction.COALESCED.value, "job_id": ids[1]}
        if not running and sum(q.count for q in self.queues.values()) >= self.settings.train_queue_max_projects:
            return {"action": ScheduleAction.DROPPED.value, "job_id": None}
        slot = 1 - running[0] if running else 0
        old = jobs[slot]
        if old is not None:
            old.delete()  # a finished/failed run under this id; its outcome is in the job record
        queue_name = self.queue_for(pid, force_pretrain)
        job = self.queues[queue_name].enqueue(
            self.job_func,
            args=(pid, str(self.settings.model_dir), bool(force_pretrain)),
            job_id=ids[slot],
            job_timeout=self.settings.job_timeout_s,
            retry=Retry(max=self.settings.job_retries) if self.settings.job_retries > 0 else None,
            result_ttl=RESULT_TTL_S,
            failure_ttl=FAILURE_TTL_S,
            description=f"train project {pid} ({reason})",
            meta={"reason": reason, "force_pretrain": bool(force_pretrain)},
            on_failure=Callback(on_job_failure),
        )
        action = ScheduleAction.FOLLOW_UP if running else ScheduleAction.QUEUED
        return {"action": action.value, "job_id": job.id, "queue": queue_name}

    # --- status --------------------------------------------------------------------------------------
    def status(self, project_id: int) -> dict[str, Any]:
        pid = int(project_id)
        record = JobRecords(self.settings.project(pid)).read()
        record["scheduler"] = self.kind
        try:
            jobs = Job.fetch_many(list(job_ids(pid)), connection=self.redis)
            coalesced = int(self.redis.get(coalesced_key(pid)) or 0)
        except RedisError as exc:
            record.update(queued=None, running=None, queue_error=f"Redis unreachable: {exc}")
            return record
        live = {job.id: job.get_status(refresh=False) for job in jobs if job is not None}
        record["jobs"] = {job_id: (status.value if status else None) for job_id, status in live.items()}
        record["queued"] = any(s in WAITING for s in live.values())
        record["running"] = any(s == JobStatus.STARTED for s in live.values())
        record["counts"]["coalesced"] += coalesced
        if not record["queued"]:
            record["queued_since"] = None  # e.g. the queue was lost with a Redis restart
            record["queued_reason"] = None
        if not record["running"]:
            record["running_since"] = record["running_job_id"] = None
        return record

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scheduler": self.kind, "redis_url": _redact(self.settings.redis_url)}
        try:
            self.redis.ping()
            out["queues"] = {name: q.count for name, q in self.queues.items()}
            out["workers"] = Worker.count(connection=self.redis)
            out["ok"] = True
            out["redis"] = "ok"
            if out["workers"] == 0:
                out["warning"] = "no `taxomoco worker` is connected to this Redis; queued jobs wait until one starts"
        except RedisError as exc:
            out["ok"] = False
            out["redis"] = f"unreachable: {type(exc).__name__}: {exc}"
        if self._last_error is not None:
            out["last_error"] = {"at": self._last_error[0], "message": self._last_error[1]}
        return out

    def close(self) -> None:
        self.redis.close()


def record_lost_run(job: Job, what: str) -> None:
    """Record the failure of a run that ended outside the job function (its process died), so that the
    project's record does not show it running for ever and says why.

    Args:
        job: the RQ job (``args = (project_id, model_dir, force_pretrain)``).
        what: what happened, e.g. "work-horse killed by signal 9".
    """
    try:
        pid, model_dir = int(job.args[0]), str(job.args[1])
    except (IndexError, TypeError, ValueError):
        log.warning("Job %s has no (project_id, model_dir) arguments; its loss is not recorded.", job.id)
        return
    left = job.retries_left or 0
    reason = f"{what} (out of memory, or the process was killed); " + (
        f"retried ({left} retries left)" if left > 0 else "no retries left")
    duration = (time.time() - job.started_at.timestamp()) if job.started_at else 0.0
    records = JobRecords(ProjectPaths(Path(model_dir), pid))
    records.mark_finished(JobOutcome.FAILED, duration, None, reason=reason)
    log.error("Project %s, job %s: %s", pid, job.id, reason)


def on_job_failure(job: Job, connection: redis.Redis, exc_type: type, exc_value: BaseException, tb: object) -> None:
    """RQ failure callback: records abandoned runs (the worker died; found by registry maintenance).

    Failures raised inside the job are recorded by the job itself (``job_records.run_recorded``).
    """
    if exc_type is AbandonedJobError or isinstance(exc_value, AbandonedJobError):
        record_lost_run(job, "the worker running it died (abandoned job)")


def _redact(url: str | None) -> str | None:
    """The Redis URL without its password."""
    if not url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
