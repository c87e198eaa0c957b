"""The training job of one Label Studio project: the same importable function for every scheduler.

:func:`train_project` takes plain arguments (a project id and the model directory), so the embedded
scheduler's child process and an RQ worker on another machine run exactly the same code. Steps:

1. pull the project from Label Studio (label config + every task with every annotation: Label Studio is
   the source of truth, a lost webhook only delays training; only changed tasks are read when a local copy
   allows, ``ml_backend.labelstudio.snapshot``);
2. consensus labels (``model.crowd.consensus``); too few labels or classes → *skipped* (recorded, not a failure);
3. images of all tasks, labelled or not, downloaded once into ``project_dir/images/<content hash>``;
4. the pretraining policy (:func:`decide_pretrain`): MoCo v2 pretraining on all images → a new encoder, or
   heads only on the live encoder;
5. embeddings through the per-encoder embedding cache (only missing images are computed);
6. heads fit with out-of-fold probabilities → a new model version published atomically (only when
   everything succeeded), old versions pruned;
7. disagreement analysis with the out-of-fold probabilities → report saved, flags posted to Label Studio
   (a failure there is logged and never unpublishes the model).

Start and outcome are written to the project's job record (``ml_backend.training.records``). The steps live in
``ml_backend.training.data`` (1-3) and ``ml_backend.training.steps`` (4-7); this module holds the policy and the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ml_backend.training.records import (
    JobRecords,
    clear_pretrain_request,
    pretrain_requested,
    read_pretrain_record,
    run_recorded,
    write_pretrain_record,
)
from ml_backend.training.calibration import label_digests, write_calibration
from ml_backend.training.data import ProjectSource, consensus_labels, labels_shortfall, pull_project, sync_images
from ml_backend.training.steps import (
    analyse_disagreements,
    cross_validate_after_publish,
    embed_all,
    fit_heads,
    live_encoder,
    pending_run,
    pretrain_encoder,
    publish_version,
)
from ml_backend.settings import Settings
from model.errors import DataError, TaxomocoError

log = logging.getLogger(__name__)

_process_settings: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Make jobs run in this process use ``settings`` (with the job's ``model_dir``) instead of reading the
    environment again; ``taxomoco worker`` calls this so its CLI overrides (e.g. ``--device``) apply."""
    global _process_settings
    _process_settings = settings


def job_settings(model_dir: str) -> Settings:
    """The settings a job runs with: the process's (see :func:`use_settings`) or the environment's."""
    if _process_settings is not None:
        return dataclasses.replace(_process_settings, model_dir=Path(model_dir))
    return Settings.from_env(model_dir=model_dir)


# --------------------------------------------------------------------------------------------------------
# Policy
# --------------------------------------------------------------------------------------------------------


class PretrainReason(str, Enum):
    """Why a run pretrains the encoder (or why it does not)."""

    FIRST = "first training: no encoder pretrained on this project yet"
    FORCED = "pretraining was asked for"
    GREW = "the project gained enough new images since the last pretraining"
    NO_ENCODER = "the live model's encoder is missing"
    HEADS_ONLY = "heads only on the live encoder"


@dataclass(frozen=True)
class PretrainDecision:
    """Whether to pretrain, why, and the numbers behind it."""

    pretrain: bool
    reason: PretrainReason
    n_images: int
    n_images_at_last_pretrain: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"pretrain": self.pretrain, "reason": self.reason.value, "n_images": self.n_images,
                "n_images_at_last_pretrain": self.n_images_at_last_pretrain}


def decide_pretrain(
    n_images: int, record: dict[str, Any] | None, has_live_encoder: bool, force: bool, repretrain_fraction: float
) -> PretrainDecision:
    """The pretraining policy.

    Args:
        n_images: readable images of the project now.
        record: the last pretraining's record (``{"n_images": ...}``), None when there was none.
        has_live_encoder: whether a live model (with its encoder) exists to train heads on.
        force: pretraining was asked for (``force_pretrain``).
        repretrain_fraction: pretrain again when ``n_images >= (1 + fraction) * n_images_at_last_pretrain``.
    """
    last = int(record["n_images"]) if record and "n_images" in record else None
    if force:
        return PretrainDecision(True, PretrainReason.FORCED, n_images, last)
    if last is None:
        return PretrainDecision(True, PretrainReason.FIRST, n_images, last)
    if not has_live_encoder:
        return PretrainDecision(True, PretrainReason.NO_ENCODER, n_images, last)
    if n_images - last >= repretrain_fraction * max(last, 1):
        return PretrainDecision(True, PretrainReason.GREW, n_images, last)
    return PretrainDecision(False, PretrainReason.HEADS_ONLY, n_images, last)


# --------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------


WARM_IMPORTS: tuple[str, ...] = (
    "torch", "model.heads.training", "model.bundle", "model.encoder.cache", "model.encoder.backbone", "model.images",
    "model.crowd.consensus", "ml_backend.net.images", "ml_backend.labelstudio.client", "ml_backend.labelstudio.label_config",
    "ml_backend.labelstudio.connections", "ml_backend.training.disagreements", "ml_backend.labelstudio.snapshot",
)
"""What a heads-only run imports (about 4 CPU-seconds: torch, torchvision, scipy); see :func:`warm_up`.
``model.ssl.pretrain`` (Lightning, 2-3 s more) is left to the runs that pretrain, which take minutes anyway."""


def warm_up() -> None:
    """Import everything a training run needs, so that a process waiting for its job starts it at once
    (the embedded scheduler's spare child calls this while idle)."""
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    from ml_backend.labelstudio.client import preload_sdk

    preload_sdk()


def current_job_id(project_id: int) -> str:
    """The RQ job id when run by an RQ worker, else a fresh local id."""
    try:
        from rq import get_current_job

        job = get_current_job()
    except Exception:  # no RQ context (embedded child, CLI): a local id
        job = None
    return job.id if job is not None else f"local-{int(project_id)}-{uuid.uuid4().hex[:8]}"


def train_project(project_id: int, model_dir: str, force_pretrain: bool = False) -> dict[str, Any]:
    """Train (or skip) one Label Studio project and publish a new model version.

    Args:
        project_id: Label Studio project id.
        model_dir: root of all projects' data (``MODEL_DIR``; the same path on server and workers).
        force_pretrain: pretrain the encoder whatever the policy says.

    Returns:
        ``{"status": "succeeded"|"skipped", "version", "reason", "counts", "durations_s", "pretrain",
        "calibration" (reused or cross-validated first, and why), "pull" (full or incremental, tasks read)}``.

    Raises:
        TaxomocoError: subclasses naming the cause (no Label Studio connection, bad label config, no
            readable image, …); the failure is recorded in the job record first.
    """
    settings = job_settings(model_dir)
    pid = int(project_id)
    records = JobRecords(settings.project_dir(pid), pid)
    return run_recorded(records, current_job_id(pid), lambda: _train(settings, pid, force_pretrain))


@contextlib.contextmanager
def _timed(durations: dict[str, float], step: str) -> Iterator[None]:
    start = time.monotonic()
    log.info("step %s ...", step)
    yield
    durations[step] = round(time.monotonic() - start, 3)
    log.info("step %s done in %.1f s", step, durations[step])


def _train(settings: Settings, pid: int, force_pretrain: bool) -> dict[str, Any]:
    durations: dict[str, float] = {}
    with _timed(durations, "pull"):
        source = pull_project(settings, pid)
    try:
        return _train_pulled(settings, pid, force_pretrain, source, durations)
    finally:
        source.client.close()


def _train_pulled(settings: Settings, pid: int, force_pretrain: bool, source: ProjectSource,
                  durations: dict[str, float]) -> dict[str, Any]:
    project_dir = settings.project_dir(pid)
    with _timed(durations, "labels"):
        labels = consensus_labels(settings, source)
    counts: dict[str, int] = {"tasks": len(source.tasks), "labelled": len(labels.result.labels),
                              "excluded": len(labels.result.excluded), "annotation_problems": len(labels.problems)}
    skip = labels_shortfall(labels.result.labels, settings.min_labels_to_train)
    if skip is not None:
        log.info("Project %s skipped: %s", pid, skip)
        return {"status": "skipped", "reason": skip, "counts": counts, "durations_s": durations}
    with _timed(durations, "images"):
        images = sync_images(settings, pid, source)
    counts.update(images=len(images.paths), unreadable_images=len(images.failed))
    if not images.paths:
        first = next(iter(images.failed.values()), "no image values")
        raise DataError(f"none of the {len(source.tasks)} tasks' images could be fetched (first error: {first}); "
                        "check LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, ALLOWED_IMAGE_HOSTS and LOCAL_FILES_ROOT.")
    live = live_encoder(settings, pid)
    decision = decide_pretrain(len(images.paths), read_pretrain_record(project_dir), live is not None,
                               force_pretrain or pretrain_requested(project_dir), settings.repretrain_fraction)
    log.info("Project %s: pretrain=%s (%s)", pid, decision.pretrain, decision.reason.value)
    if decision.pretrain:
        with _timed(durations, "pretrain"):
            encoder = pretrain_encoder(settings, pid, images, init=live)
    else:
        assert live is not None
        encoder = live
    with _timed(durations, "embed"):
        emb, ok = embed_all(settings, pid, encoder, images)  # (N, D), (N,)
    counts["embedded"] = int(ok.sum())
    with _timed(durations, "fit"):
        fit, reuse = fit_heads(settings, pid, source, labels, images, emb, ok, encoder)
    counts["trained_on"] = len(fit.task_ids)
    with _timed(durations, "publish"):
        version = publish_version(settings, pid, source, labels, images, encoder, fit, decision, counts, reuse)
    if decision.pretrain:  # only once the new encoder is live: a failed publish pretrains again
        write_pretrain_record(project_dir, len(images.paths), encoder.version)
        pending_run(project_dir, clear=True)
        clear_pretrain_request(project_dir)
    if reuse.reuse:  # the version is live; the cross-validation it skipped runs now
        with _timed(durations, "cross_validation"):
            fit = cross_validate_after_publish(fit, emb, source)
    write_calibration(project_dir, fit.result.temperature, fit.result.metrics, encoder.version, version,
                      label_digests(fit.pairs))
    try:
        with _timed(durations, "disagreements"):
            counts["flags"] = analyse_disagreements(settings, pid, source, labels, images, emb, ok, fit, version)
    except Exception as exc:  # never unpublish a model for a report; say why in the log
        log.error("Project %s: disagreement analysis failed (model %s stays live): %s", pid, version, exc,
                  exc_info=not isinstance(exc, TaxomocoError))
        counts["flags"] = -1
    return {"status": "succeeded", "version": version, "counts": counts, "durations_s": durations,
            "pretrain": decision.to_dict(), "calibration": reuse.to_dict(), "pull": source.pull}
