"""A training job's after-publish work, and when it is left to the follow-up training.

Once a job has published its version, three things remain: the cross-validation a reused calibration skipped (the
out-of-fold probabilities and the next temperature), the disagreement analysis (report and Label Studio flags) and
the bulk pre-annotation (``ml_backend.prelabel``). Together they take as long as the training itself (seconds at
1,000 tasks, tens of seconds at 10,000: ``bench/results/retrain_latency.txt``), and the project's next training
cannot start before they end.

While labelers work, the next training is usually already waiting when a job publishes: both schedulers record it
in the job record the moment the event arrives (``queued_since``; ``ml_backend.queue``). Its version supersedes
this one within seconds and redoes all three on newer labels, so this job leaves them to it: its version goes live
at once, and the annotations behind the follow-up get theirs without waiting for work nobody would see. The last
training of a burst (nothing waits) does them all; so does any training when the labelers pause.

A job that deferred its after-publish work writes no calibration record for a cross-validation it did not run: the
next training compares its labels with the last one that did run (``ml_backend.training.calibration``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ml_backend.paths import ProjectPaths
from ml_backend.training.records import JobRecords

__all__ = ["TailDecision", "decide_tail"]


@dataclass(frozen=True)
class TailDecision:
    """Whether a published job runs its after-publish work, and why."""

    defer: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"deferred": self.defer, "reason": self.reason}


def decide_tail(paths: ProjectPaths) -> TailDecision:
    """Defer the after-publish work when another training of the project already waits (see the module)."""
    queued_since = JobRecords(paths).read().get("queued_since")
    if queued_since:
        return TailDecision(True, f"a follow-up training waits since {queued_since}: its version supersedes this one "
                                  "and runs the cross-validation, the disagreement analysis and the pre-annotation")
    return TailDecision(False, "no training waits")
