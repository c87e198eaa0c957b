"""Bulk pre-annotation: the served version's predictions for every unlabelled task, written into Label Studio.

The served version (:func:`served_version`) is the live model version; before the heads train, the live
propagation version (``ml_backend.training.propagation``, ``PROPAGATION``). One run (:func:`run_prelabel`), for the
version served when it starts:

1. the tasks of the last pull (``ProjectPaths.tasks_snapshot``); targets are the tasks without a human annotation
   (an annotation that is not cancelled and, unless ``TRAIN_ON_PREDICTION_COPIES``, not a copy of a prediction:
   ``ml_backend.labelstudio.copies``), in id order;
2. predictions of every task from the embedding cache (``ml_backend.prelabel.live``), or the stored propagated
   paths (``ml_backend.prelabel.propagated``), then the labeling order and the "label next" tab
   (``ml_backend.prelabel.order``);
3. chunks of ``PRELABEL_CHUNK`` predictions through ``POST /api/projects/<id>/import/predictions``; after each
   chunk the record (``ml_backend.prelabel.progress``) moves its cursor. A run stops as *superseded* when another
   version went live meanwhile, or when a training of the project waits (its version is seconds away:
   ``ml_backend.training.tail``); a crashed or failed run of the same version resumes after the cursor, and the
   chunk that was in flight is checked task by task so that nothing is written twice;
4. once every target holds a prediction of the version: ``project.model_version`` is pinned to it (the Data
   Manager's *Prediction score* column and Label Studio's uncertainty sampling use that version);
5. clean-up policy: predictions of this backend's older versions (names ``<UTC stamp>-<6 hex>``, and
   ``propagation-<labels>-<UTC stamp>-<6 hex>``) are deleted, except the ``PRELABEL_KEEP_VERSIONS - 1`` newest
   before the live one; once a model version (heads) is served, every propagation version counts as older than it
   and is deleted whatever the keep setting. Predictions of other models, and versions newer than the live one,
   are never touched. It runs after the pin, because Label Studio clears ``project.model_version`` when the version
   it names is deleted. Predictions are deleted one per request (``delete_version_predictions``: Label Studio's
   delete of a whole version is one long transaction that locks a SQLite database for minutes at 10,000 tasks),
   and the clean-up gives way like the writing does; a later run deletes what is left. The record shows the
   clean-up's progress while it runs (``phase`` ``cleaning``, ``cleanup_done`` of ``cleanup_total``);
6. after a clean-up that deleted predictions, and unless a training waits, the task snapshot is brought up to date
   (``ml_backend.labelstudio.snapshot.pull_tasks``): deleting a prediction moves its task's ``updated_at``, so
   the next incremental pull would read every touched task again (16.5 s for 8,000 at 10,000 tasks, measured),
   inside the next annotation's wait for its version. Read here, the next training reads only what changed after.

Tasks imported after the pull get their predictions from ``/predict`` as before (Label Studio asks for tasks
that hold none) and from the next version's run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.connections import resolve
from ml_backend.labelstudio.copies import read_remembered
from ml_backend.labelstudio.label_config import parse_label_config
from ml_backend.labelstudio.predictions import (
    delete_version_predictions,
    import_predictions,
    model_version_counts,
    pin_model_version,
    project_model_version,
    task_prediction_versions,
)
from ml_backend.labelstudio.snapshot import pull_tasks, read_tasks
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.live import LivePredictions
from ml_backend.prelabel.order import update_label_next_tab, write_queue
from ml_backend.prelabel.progress import PrelabelPhase, PrelabelState, Progress, read_progress, write_progress
from ml_backend.prelabel.propagated import PropagatedPredictions
from ml_backend.settings import Settings
from ml_backend.training.propagation import is_propagation_version, live_propagation, version_stamp
from ml_backend.training.records import utc_now
from ml_backend.training.tail import decide_tail
from model.bundle import live_version
from model.errors import DataError

__all__ = ["OUR_VERSION", "has_human_label", "run_prelabel", "served_version", "versions_to_delete"]

log = logging.getLogger(__name__)

OUR_VERSION = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}$")
"""This backend's model version names (``model.bundle``); only these are ever cleaned up."""
RECORD_EVERY_S = 2.0
"""While the clean-up deletes (one request per prediction, minutes at 10,000 tasks), the record is saved this often."""


def has_human_label(task: TaskRecord, copies: AbstractSet[int] = frozenset()) -> bool:
    """Whether a person labelled the task: an annotation that is not cancelled and whose id is not in ``copies``."""
    return any(not a.get("was_cancelled") and a.get("id") not in copies for a in task.annotations)


def _age(version: str) -> tuple[int, str] | None:
    """Sort key of this backend's versions (propagation versions before every model version), None for others."""
    if OUR_VERSION.match(version):
        return (1, version)
    stamp = version_stamp(version)
    return (0, stamp) if stamp is not None else None


def versions_to_delete(counts: dict[str, int], live: str, keep: int) -> list[str]:
    """The clean-up policy: this backend's versions older than ``live`` except the ``keep - 1`` newest of them; when
    ``live`` is a model version, every propagation version (the heads replaced label propagation)."""
    live_age = _age(live)
    if live_age is None:
        return []
    aged = {v: a for v in counts if (a := _age(v)) is not None and a < live_age}
    older = sorted(aged, key=aged.__getitem__)
    same_kind = [v for v in older if aged[v][0] == live_age[0]]
    kept = set(same_kind[max(0, len(same_kind) - (keep - 1)):]) if keep > 1 else set()
    return [v for v in older if v not in kept]


def served_version(settings: Settings, paths: ProjectPaths) -> str | None:
    """The version whose predictions the loop writes: the live model version, else (``PROPAGATION``) the live
    propagation version, else None."""
    heads = live_version(paths.models)
    if heads is not None or not settings.propagation:
        return heads
    return live_propagation(paths)


def run_prelabel(settings: Settings, paths: ProjectPaths, job_id: str | None = None) -> dict[str, Any]:
    """Write the served version's predictions for every unlabelled task into Label Studio (see the module).

    Returns:
        The run's record (:class:`~ml_backend.prelabel.progress.Progress` as a dict) plus ``"status"``:
        ``done``, ``superseded``, ``skipped`` (no version, or already done) .

    Raises:
        TaxomocoError: (or a subclass: Label Studio unreachable, no task snapshot, ...) after recording it as the
            run's ``error``; the next run of the same version resumes.
    """
    version = served_version(settings, paths)
    if version is None:
        return {"status": "skipped", "reason": "no model version (nor propagation version) is served yet"}
    previous = read_progress(paths)
    if previous is not None and previous.version == version and previous.state is PrelabelState.DONE:
        return {**previous.to_dict(), "status": "skipped", "reason": f"version {version} is written already"}
    resume = previous is not None and previous.version == version
    progress = previous if resume else Progress(version=version)
    assert progress is not None
    progress.state, progress.job_id, progress.error, progress.finished_at = PrelabelState.RUNNING, job_id, None, None
    progress.phase = PrelabelPhase.WRITING
    progress.started_at = progress.started_at or utc_now()
    client = None
    try:
        client = resolve(settings, paths.project_id).client()
        return _run(settings, paths, client, progress, resume)
    except Exception as exc:  # the job boundary: record why, then let the scheduler see the failure
        if read_progress(paths) is None or read_progress(paths).version == version:  # type: ignore[union-attr]
            progress.state, progress.error = PrelabelState.FAILED, f"{type(exc).__name__}: {exc}"
            progress.updated_at = progress.finished_at = utc_now()
            write_progress(paths, progress)
        log.error("Project %s: pre-annotation of %s failed: %s", paths.project_id, version, exc)
        raise
    finally:
        if client is not None:
            client.close()


def _run(settings: Settings, paths: ProjectPaths, client: LabelStudioClient, progress: Progress,
         resume: bool) -> dict[str, Any]:
    pid, version = paths.project_id, progress.version
    tasks = read_tasks(paths.tasks_snapshot)
    if tasks is None:
        raise DataError(f"Project {pid} has no readable task snapshot ({paths.tasks_snapshot}); the next training "
                        "run writes one (POST /train).")
    label_config = client.get_project(pid).label_config
    config = parse_label_config(label_config)
    if is_propagation_version(version):
        live: LivePredictions | PropagatedPredictions = PropagatedPredictions(paths, config, version)
    else:
        live = LivePredictions(settings, paths, client, config)
    if live.version != version or served_version(settings, paths) != version:
        return _superseded(paths, progress)
    copies = set() if settings.train_on_prediction_copies else set(read_remembered(paths.prediction_copies))
    labelled = np.array([has_human_label(t, copies) for t in tasks], dtype=bool)
    every = live.predict(tasks)
    queue = write_queue(paths, every, labelled, len(config.taxonomy.leaves()), settings.cold_start_per_class)
    if settings.label_next_tab_tasks > 0 and settings.post_flags_to_label_studio:
        update_label_next_tab(client, pid, queue, settings.label_next_tab_tasks)
    rows = {tid: i for i, tid in enumerate(every.task_ids)}
    targets = sorted(t.id for t, lab in zip(tasks, labelled) if not lab)
    progress.total = len(targets)
    if not resume:
        progress.done, progress.after_task, progress.created, progress.dropped = 0, -1, 0, 0
    todo = [t for t in targets if t > progress.after_task]
    progress.done = len(targets) - len(todo)
    if progress.in_flight:  # the process died during this chunk's request: skip what reached Label Studio
        landed = {t for t in progress.in_flight if version in task_prediction_versions(client, t)}
        todo = [t for t in todo if t not in landed]
        progress.done += len(landed)
        progress.created += len(landed)
        progress.in_flight = None
    write_progress(paths, progress)
    start, sent = time.monotonic(), 0
    for at in range(0, len(todo), settings.prelabel_chunk):
        if served_version(settings, paths) != version or decide_tail(paths).defer:  # a newer version is live or waits
            return _superseded(paths, progress)
        chunk = todo[at:at + settings.prelabel_chunk]
        progress.in_flight = chunk
        write_progress(paths, progress)
        items = [{"task": t, **every.items[rows[t]]} for t in chunk]
        created = import_predictions(client, pid, items)
        sent += len(chunk)
        progress.created += created
        progress.dropped += len(chunk) - created
        progress.done += len(chunk)
        progress.after_task, progress.in_flight = chunk[-1], None
        progress.rate_per_s = round(sent / max(time.monotonic() - start, 1e-6), 1)
        progress.updated_at = utc_now()
        write_progress(paths, progress)
    if progress.dropped:
        log.warning("Project %s: Label Studio did not create %d of the predictions of %s.", pid, progress.dropped,
                    version)
    counts = model_version_counts(client, pid)
    if counts.get(version, 0) >= len(targets) and project_model_version(client, pid) != version:
        pin_model_version(client, pid, version)
    progress.pinned = project_model_version(client, pid) == version
    if progress.pinned and (old := versions_to_delete(counts, version, settings.prelabel_keep_versions)):
        _clean_up(settings, paths, client, progress, old, {v: counts.get(v, 0) for v in old}, label_config)
    progress.state = PrelabelState.DONE
    progress.updated_at = progress.finished_at = utc_now()
    write_progress(paths, progress)
    log.info("Project %s: %d predictions of %s written (%.0f/s), pinned=%s, deleted predictions %s, %d tasks read "
             "again after the clean-up (%.1f s).", pid, progress.created, version, progress.rate_per_s,
             progress.pinned, progress.deleted, progress.repulled, progress.repull_s)
    return {**progress.to_dict(), "status": "done"}


def _clean_up(settings: Settings, paths: ProjectPaths, client: LabelStudioClient, progress: Progress,
              old: list[str], counts: dict[str, int], label_config: str) -> None:
    """Steps 5 and 6: delete the older versions' predictions (the record saved every ``RECORD_EVERY_S`` meanwhile,
    so ``/job_status`` shows how far it got), then read the touched tasks again."""
    pid, version = paths.project_id, progress.version
    before = dict(progress.deleted)
    progress.phase, progress.cleanup_total, progress.cleanup_done = PrelabelPhase.CLEANING, sum(counts.values()), 0
    progress.updated_at = utc_now()
    write_progress(paths, progress)
    saved = time.monotonic()

    def newer_waits() -> bool:  # the clean-up gives way to the next version; a later run finishes it
        return served_version(settings, paths) != version or decide_tail(paths).defer

    def one_deleted(old_version: str) -> None:
        nonlocal saved
        progress.cleanup_done += 1
        progress.deleted[old_version] = progress.deleted.get(old_version, 0) + 1
        if time.monotonic() - saved >= RECORD_EVERY_S:
            progress.updated_at = utc_now()
            write_progress(paths, progress)
            saved = time.monotonic()

    deleted = delete_version_predictions(client, pid, old, stop=newer_waits, on_deleted=one_deleted)
    progress.deleted = {v: before.get(v, 0) + deleted.get(v, 0) for v in {*before, *deleted}}
    if sum(deleted.values()) and not newer_waits():  # the touched tasks read now, not by the next training
        progress.phase, progress.updated_at = PrelabelPhase.REREADING, utc_now()
        write_progress(paths, progress)
        started = time.monotonic()
        pull = pull_tasks(client, pid, paths.tasks_snapshot, label_config, settings.tasks_full_pull_every_s)
        progress.repulled, progress.repull_s = pull.read, round(time.monotonic() - started, 2)


def _superseded(paths: ProjectPaths, progress: Progress) -> dict[str, Any]:
    """A newer version went live: leave the record to its run (write ours only while it is still the latest)."""
    current = read_progress(paths)
    progress.state = PrelabelState.SUPERSEDED
    progress.updated_at = progress.finished_at = utc_now()
    if current is None or current.version == progress.version:
        write_progress(paths, progress)
    log.info("Project %s: pre-annotation of %s stopped: a newer version is live.", paths.project_id, progress.version)
    return {**progress.to_dict(), "status": "superseded"}
