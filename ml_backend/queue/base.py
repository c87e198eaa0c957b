"""Training schedulers: turn Label Studio events into at most one queued + one running job per project.

``make_scheduler(settings)`` picks the implementation:

* no ``REDIS_URL`` → :class:`ml_backend.queue.embedded.EmbeddedScheduler`: one background thread in
  the server process runs jobs one at a time, each in a fresh child process;
* ``REDIS_URL`` set → :class:`ml_backend.queue.rq_queue.RQScheduler`: jobs go to RQ queues consumed by
  ``taxomoco worker`` processes (``ml_backend.queue.worker``), possibly on other (GPU) machines.

Both call the same importable job, :func:`ml_backend.training.jobs.train_project`, and both coalesce bursts: an
event that arrives while a job of the project waits is folded into it (the job pulls every annotation from
Label Studio when it starts), an event that arrives while one runs gets exactly one follow-up run.
"""

from __future__ import annotations

import abc
import importlib
from enum import Enum
from typing import Any

from model.errors import ConfigError

__all__ = ["DEFAULT_JOB_FUNC", "ScheduleAction", "Scheduler", "import_job_func"]

DEFAULT_JOB_FUNC = "ml_backend.training.jobs.train_project"
"""Dotted path of the job every scheduler runs (importable in a child process or an RQ worker)."""


class ScheduleAction(str, Enum):
    """What :meth:`Scheduler.schedule` did with an event."""

    QUEUED = "queued"  # a new job waits (nothing was waiting or running)
    FOLLOW_UP = "follow-up"  # a job runs; one more run was queued after it
    COALESCED = "coalesced"  # a job already waits; it will see this event's annotations
    ERROR = "error"  # the queue is unreachable; nothing was queued (see "reason")
    DROPPED = "dropped"  # TRAIN_QUEUE_MAX_PROJECTS projects already wait; nothing was queued


class Scheduler(abc.ABC):
    """Interface of the training schedulers used by the HTTP app."""

    kind: str = "abstract"

    @abc.abstractmethod
    def schedule(self, project_id: int, reason: str, force_pretrain: bool = False) -> dict[str, Any]:
        """Ask for a training run of a project; never trains in the caller and never raises.

        Args:
            project_id: Label Studio project id.
            reason: what asked for it (a webhook action such as ``ANNOTATION_CREATED``, ``train`` …).
            force_pretrain: make the run pretrain the encoder again whatever the policy says.

        Returns:
            ``{"project_id", "scheduler", "action": ScheduleAction value, "job_id", ...}``; with
            ``action == "error"`` a ``"reason"``.
        """

    @abc.abstractmethod
    def status(self, project_id: int) -> dict[str, Any]:
        """The project's job record (see :mod:`ml_backend.training.records`) plus live queue state:
        ``queued`` / ``running`` booleans and the scheduler kind."""

    @abc.abstractmethod
    def health(self) -> dict[str, Any]:
        """``{"scheduler": kind, "ok": bool, ...}``; ``ok`` is False when jobs cannot be queued or run."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop background work and release connections (idempotent)."""


def import_job_func(dotted: str) -> Any:
    """Import ``package.module.function`` and return the function."""
    module_name, _, func_name = dotted.rpartition(".")
    if not module_name:

        raise ConfigError(f"Job function {dotted!r} is not a dotted path such as 'ml_backend.training.jobs.train_project'.")
    return getattr(importlib.import_module(module_name), func_name)
