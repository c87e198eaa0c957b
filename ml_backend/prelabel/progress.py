"""Bulk pre-annotation progress of a project: the record ``/job_status`` and ``/metrics`` show, and the resume cursor.

One JSON file, ``ProjectPaths.prelabel``, replaced atomically after every chunk. A run of the same model version
that finds it ``running`` or ``failed`` resumes after ``after_task``; the chunk named in ``in_flight`` may or may
not have reached Label Studio (the process died during the request), so its tasks are checked before they are
written again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ml_backend.paths import ProjectPaths
from model.atomic import atomic_write_json

__all__ = ["PrelabelPhase", "PrelabelState", "Progress", "read_progress", "write_progress"]

log = logging.getLogger(__name__)


class PrelabelPhase(str, Enum):
    """What a running pre-annotation run is doing (the last phase it reached, once it stopped)."""

    WRITING = "writing"  # importing the version's predictions, chunk by chunk
    CLEANING = "cleaning"  # deleting older versions' predictions, one per request (``cleanup_done`` of ``_total``)
    REREADING = "rereading"  # reading the tasks the clean-up touched (``repulled``)


class PrelabelState(str, Enum):
    """Where a bulk pre-annotation run stands."""

    RUNNING = "running"  # writing chunks (or interrupted while it did: resumed by the next run of the version)
    DONE = "done"  # every unlabelled task holds a prediction of the version; pinned; old versions cleaned up
    FAILED = "failed"  # stopped with an error (see ``error``); the next run of the version resumes
    SUPERSEDED = "superseded"  # a newer model version went live; its own run takes over


@dataclass
class Progress:
    """One run's progress (all times UTC ISO-8601).

    Attributes:
        version: the model version whose predictions are written.
        state: see :class:`PrelabelState`.
        total: unlabelled tasks to write (tasks without a human annotation at the last pull).
        done: tasks written so far (cursor position).
        after_task: cursor: every target task with an id up to this one is written (-1: none yet).
        in_flight: ids of the chunk being written when the record was saved (None between chunks).
        created: predictions Label Studio reported created by this version's runs.
        dropped: predictions sent that Label Studio did not create (it drops invalid items silently).
        pinned: the project's ``model_version`` was set to ``version``.
        phase: see :class:`PrelabelPhase`.
        deleted: older model versions whose predictions were deleted, with how many (kept up to date while the
            clean-up runs).
        cleanup_total: predictions of older versions the run's clean-up set out to delete (counted at its start).
        cleanup_done: of these, deleted so far (the record is saved every few seconds while it deletes).
        repulled: tasks the run read again after its clean-up (the incremental pull that a clean-up makes long,
            taken here instead of by the next training); 0 when it deleted nothing or a training waited.
        repull_s: seconds that pull took.
        rate_per_s: predictions written per second over this run.
        job_id: the job that wrote the record.
        error: why the run failed (``failed`` only).
    """

    version: str
    state: PrelabelState = PrelabelState.RUNNING
    total: int = 0
    done: int = 0
    after_task: int = -1
    in_flight: list[int] | None = None
    created: int = 0
    dropped: int = 0
    pinned: bool = False
    phase: PrelabelPhase = PrelabelPhase.WRITING
    deleted: dict[str, int] = field(default_factory=dict)
    cleanup_total: int = 0
    cleanup_done: int = 0
    repulled: int = 0
    repull_s: float = 0.0
    rate_per_s: float = 0.0
    started_at: str = ""
    updated_at: str = ""
    finished_at: str | None = None
    job_id: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"], out["phase"] = self.state.value, self.phase.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["state"] = PrelabelState(values.get("state", PrelabelState.RUNNING.value))
        values["phase"] = PrelabelPhase(values.get("phase", PrelabelPhase.WRITING.value))
        return cls(**values)


def read_progress(paths: ProjectPaths) -> Progress | None:
    """The project's last pre-annotation record, or None (never ran, or unreadable: the next run starts over)."""
    try:
        return Progress.from_dict(json.loads(paths.prelabel.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("Pre-annotation record %s unreadable (%s); the next run starts over.", paths.prelabel, exc)
        return None


def write_progress(paths: ProjectPaths, progress: Progress) -> None:
    """Replace the record atomically."""
    atomic_write_json(paths.prelabel, progress.to_dict())
