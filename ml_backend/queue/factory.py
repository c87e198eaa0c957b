"""The scheduler the settings ask for: RQ when ``REDIS_URL`` is set, else the embedded trainer."""

from __future__ import annotations

from ml_backend.queue.base import DEFAULT_JOB_FUNC, Scheduler
from ml_backend.queue.embedded import EmbeddedScheduler
from ml_backend.queue.rq_queue import RQScheduler
from ml_backend.settings import Settings

__all__ = ["make_scheduler"]


def make_scheduler(settings: Settings, job_func: str = DEFAULT_JOB_FUNC) -> Scheduler:
    """The scheduler the settings ask for: RQ when ``settings.redis_url`` is set, else embedded.

    Args:
        settings: the process settings.
        job_func: dotted path of the job function (tests substitute small importable jobs with the
            signature of :func:`ml_backend.training.jobs.train_project`).
    """
    if settings.redis_url:

        return RQScheduler(settings, job_func=job_func)

    return EmbeddedScheduler(settings, job_func=job_func)
