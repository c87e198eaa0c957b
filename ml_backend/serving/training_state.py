"""The last training of each project as the user sees it: in ``/health``, ``/versions`` and the model version.

A training that failed leaves the live model (if any) serving; the person who can fix the cause must still
learn of it where they look. Label Studio shows the model version ``/setup`` reports (the model card, and every
prediction's version), so after a failed training the reported version carries the short reason::

    20261124T010203-ab12cd · last training failed: none of the 4 tasks' images could be fetched (first error: ...)
    untrained · last training failed: ...

``/predict`` labels its predictions with the same string (Label Studio matches the two to decide what to
re-predict): the failure changes the string once, so each task is re-predicted once with the same model;
the next successful training publishes a new plain version. A skipped training (too few labels yet) does not
change the version: it shows in ``/health``, ``/versions`` and ``/job_status``.

States are read from the job records (``ml_backend.training.records``) and kept for :data:`MAX_AGE_S`, so
``/health`` and ``/setup`` stay within Label Studio's timeouts however many projects there are.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

from cachetools import TTLCache

from ml_backend.settings import Settings
from ml_backend.training.records import JobOutcome, JobRecords

__all__ = ["MAX_AGE_S", "TrainingState", "TrainingStates", "short_reason", "version_label"]

MAX_AGE_S = 1.0
"""A project's state is read from its job record at most once per this many seconds."""
FAILED_MARK = " · last training failed: "


@dataclass(frozen=True)
class TrainingState:
    """How a project's last training ended.

    Attributes:
        outcome: ``succeeded`` / ``skipped`` / ``failed``, None before any training.
        reason: why it failed or was skipped (the job record's words).
        finished_at: when it ended (UTC ISO-8601).
        live_since: the version the last successful training published.
        running: whether a training runs now; ``queued`` whether one waits.
    """

    outcome: str | None
    reason: str | None
    finished_at: str | None
    live_since: str | None
    running: bool
    queued: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def short_reason(reason: str | None, limit: int = 160) -> str:
    """A reason on one line, at most ``limit`` characters (the start says what happened)."""
    text = " ".join(str(reason or "unknown error").split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def version_label(version: str, state: TrainingState) -> str:
    """The model version reported to Label Studio: ``version``, with the short reason after a failed training."""
    if state.outcome == JobOutcome.FAILED.value:
        return f"{version}{FAILED_MARK}{short_reason(state.reason)}"
    return version


def _state(record: dict[str, Any]) -> TrainingState:
    outcome = record.get("last_outcome")
    last = {JobOutcome.FAILED.value: record.get("last_failure"), JobOutcome.SKIPPED.value: record.get("last_skip"),
            JobOutcome.SUCCEEDED.value: record.get("last_success")}.get(outcome or "") or {}
    success = record.get("last_success") or {}
    return TrainingState(outcome, last.get("reason"), last.get("finished_at"), success.get("version"),
                         bool(record.get("running_since")), bool(record.get("queued_since")))


class TrainingStates:
    """Per-project training states from the job records, each re-read at most every :data:`MAX_AGE_S`.

    Args:
        settings: where the projects' records are (``MODEL_DIR``).
    """

    def __init__(self, settings: Settings, max_projects: int = 4096) -> None:
        self.settings = settings
        self._cache: TTLCache[int, TrainingState] = TTLCache(max_projects, MAX_AGE_S)
        self._lock = threading.Lock()

    def get(self, project_id: int) -> TrainingState:
        """The project's last training (an empty state when it never trained; nothing is created on disk)."""
        pid = int(project_id)
        with self._lock:
            state = self._cache.get(pid)
        if state is None:
            state = _state(JobRecords(self.settings.project(pid)).read())
            with self._lock:
                self._cache[pid] = state
        return state

    def label(self, project_id: int, version: str) -> str:
        """:func:`version_label` of ``version`` with the project's state."""
        return version_label(version, self.get(project_id))
