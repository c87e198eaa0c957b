"""When a model version is published, or a training run made a new propagation version (before the heads train):
queue its bulk pre-annotation, or run it where the training ran.

* In an RQ worker (``REDIS_URL``): :func:`ml_backend.prelabel.job.prelabel_project` is enqueued on the heads queue
  with the deterministic job id ``taxomoco-prelabel-<project>-<version>``, so the same version is never queued
  twice and the GPU worker is free for the next training at once; a worker that dies mid-run is retried
  (``JOB_RETRIES``) and resumes from the record's cursor.
* In the embedded trainer's child process (no Redis): the run happens there, after the training job recorded its
  success, before the child exits; events meanwhile queue one follow-up training as usual.

A failure here never fails the training: it is recorded in the pre-annotation record (``/job_status``'s
``prelabel``) and the log.
"""

from __future__ import annotations

import logging
from typing import Any

from rq import Queue, Retry, get_current_job
from rq.job import Job, JobStatus

from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.progress import PrelabelState, read_progress
from ml_backend.prelabel.writer import run_prelabel
from ml_backend.settings import Settings

__all__ = ["JOB_FUNC", "after_publish", "enqueue_prelabel", "prelabel_job_id", "version_to_write"]

log = logging.getLogger(__name__)

JOB_FUNC = "ml_backend.prelabel.job.prelabel_project"
"""Dotted path of the RQ job (importable by the workers)."""

_ACTIVE = frozenset({JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED, JobStatus.CREATED})


def prelabel_job_id(project_id: int, version: str) -> str:
    """The deterministic RQ job id of one version's pre-annotation."""
    return f"taxomoco-prelabel-{int(project_id)}-{version}"


def enqueue_prelabel(connection: Any, settings: Settings, project_id: int, version: str) -> dict[str, Any]:
    """Queue the pre-annotation of ``version`` on the heads queue, unless that job already waits or runs."""
    job_id = prelabel_job_id(project_id, version)
    try:
        existing = Job.fetch(job_id, connection=connection)
    except Exception:  # rq raises NoSuchJobError (and redis errors): enqueue below
        existing = None
    if existing is not None:
        if existing.get_status(refresh=False) in _ACTIVE:
            return {"action": "exists", "job_id": job_id}
        existing.delete()
    Queue(settings.heads_queue, connection=connection).enqueue(
        JOB_FUNC, args=(int(project_id), str(settings.model_dir)), job_id=job_id, job_timeout=settings.job_timeout_s,
        retry=Retry(max=settings.job_retries) if settings.job_retries > 0 else None, result_ttl=24 * 3600,
        failure_ttl=7 * 24 * 3600, description=f"pre-annotate project {project_id} with {version}")
    return {"action": "queued", "job_id": job_id, "queue": settings.heads_queue}


def version_to_write(result: dict[str, Any]) -> str | None:
    """The version a training run's result asks to pre-annotate: the published model version, or the propagation
    version of a skipped run's cold-start work (``ml_backend.training.coldstart``); None otherwise."""
    if not isinstance(result, dict):
        return None
    if result.get("status") == "succeeded":
        return str(result["version"]) if result.get("version") else None
    cold = result.get("cold_start") if result.get("status") == "skipped" else None
    propagation = cold.get("propagation") if isinstance(cold, dict) else None
    version = propagation.get("version") if isinstance(propagation, dict) else None
    return str(version) if version else None


def after_publish(settings: Settings, paths: ProjectPaths, result: dict[str, Any]) -> dict[str, Any] | None:
    """The training job's hook once its outcome is recorded: pre-annotate a new version (:func:`version_to_write`).

    Args:
        settings: the job's settings (``prelabel`` off: nothing happens).
        paths: the project's files.
        result: the training job's result.

    Returns:
        What was done (queued, or the run's record), or None when there is nothing to write, the version is written
        already, or pre-annotation is off.
    """
    version = version_to_write(result)
    if not settings.prelabel or not version:
        return None
    done = read_progress(paths)
    if done is not None and done.version == version and done.state is PrelabelState.DONE:
        return None  # a cold-start run with nothing new keeps its propagation version
    try:
        job = get_current_job()
    except Exception:  # no RQ context (embedded child, CLI)
        job = None
    try:
        if job is not None:
            return enqueue_prelabel(job.connection, settings, paths.project_id, str(version))
        return run_prelabel(settings, paths, job_id=f"inline-{paths.project_id}-{version}")
    except Exception as exc:  # never fail a published training for its pre-annotation; recorded by run_prelabel
        log.error("Project %s: pre-annotation of %s not done: %s: %s", paths.project_id, version,
                  type(exc).__name__, exc)
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
