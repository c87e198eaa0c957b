"""The training job of one Label Studio project: the same importable function for every scheduler.

:func:`train_project` takes plain arguments (a project id and the model directory), so the embedded
scheduler's child process and an RQ worker on another machine run exactly the same code. Steps:

1. pull the project from Label Studio (label config + every task with every annotation: Label Studio is
   the source of truth, a lost webhook only delays training; only changed tasks are read when a local copy
   allows, ``ml_backend.labelstudio.snapshot``);
2. consensus labels (``model.crowd.consensus``); too few labels or classes → *skipped* (recorded, not a failure),
   after the cold-start work (``ml_backend.training.coldstart``: images, encoder, embeddings, kNN index, label
   propagation from the first label on, the labeling order), reported in the skip's result;
3. images of all tasks, labelled or not, downloaded once into ``ProjectPaths.images`` by content hash;
4. the pretraining policy (``ml_backend.training.policy``): MoCo v2 pretraining on all images → a new encoder, or
   heads only on the live encoder;
5. features of every candidate's source (``ml_backend.training.features``: the encoder, the previous live
   encoder after a pretraining, plain pixels) through the embedding cache (only missing images are computed), and
   the project's kNN index and duplicate groups of the published encoder (``ml_backend.training.neighbors``: new
   images added, rebuilt for a new encoder);
6. the candidates compared by cross-validated hierarchical F1, the best one's heads fitted with out-of-fold
   calibration (``ml_backend.training.fit``) → a new model version published atomically (only when
   everything succeeded), old versions pruned;
7. disagreement analysis with the out-of-fold probabilities → report saved, flags posted to Label Studio
   (a failure there is logged and never unpublishes the model).

Start and outcome are written to the project's job record (``ml_backend.training.records``). Each step lives in
its own module of ``ml_backend.training`` (pull, labels, images, policy, encoder, fit, publish, disagreements);
this module holds their order.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any

from rq import get_current_job

from ml_backend.labelstudio.sdk import preload_sdk
from ml_backend.paths import ProjectPaths
from ml_backend.prelabel.schedule import after_publish
from ml_backend.settings import Settings
from ml_backend.training.calibration import label_digests, write_calibration
from ml_backend.training.coldstart import cold_start
from ml_backend.training.disagreements import analyse_disagreements
from ml_backend.training.encoder import choose_encoder, pending_run
from ml_backend.training.features import embed_features
from ml_backend.training.fit import cross_validate_after_publish, fit_heads
from ml_backend.training.images import require_images, sync_images
from ml_backend.training.labels import consensus_labels, labels_shortfall
from ml_backend.training.neighbors import update_neighbors
from ml_backend.training.policy import clear_pretrain_request, write_pretrain_record
from ml_backend.training.propagation_model import choose_propagation
from ml_backend.training.publish import publish_version, published_encoder
from ml_backend.training.pull import ProjectSource, pull_project
from ml_backend.training.records import JobRecords, run_recorded, timed_step
from ml_backend.training.tail import decide_tail
from model.errors import TaxomocoError
from model.heads.candidates import FeatureSource

__all__ = ["current_job_id", "job_settings", "train_project", "use_settings", "warm_up"]

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


def warm_up() -> None:
    """Load what a training run needs beyond this module's imports (torch, torchvision, scipy: about 4 CPU-seconds),
    so that a process waiting for its job starts it at once (the embedded scheduler's spare child calls this while
    idle). ``model.ssl.pretrain`` (Lightning, 2-3 s more) is left to the runs that pretrain, which take minutes."""
    preload_sdk()


def current_job_id(project_id: int) -> str:
    """The RQ job id when run by an RQ worker, else a fresh local id."""
    try:
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
        "calibration" (reused or cross-validated first, and why), "pull" (full or incremental, tasks read),
        "model_choice" (the published candidate, why, every candidate's cross-validated hF)}``; a skip carries
        ``"cold_start"`` instead (``ml_backend.training.coldstart``: what was prepared and written).

    Raises:
        TaxomocoError: subclasses naming the cause (no Label Studio connection, bad label config, no
            readable image, …); the failure is recorded in the job record first.
    """
    settings = job_settings(model_dir)
    pid = int(project_id)
    paths = settings.project(pid)
    result = run_recorded(JobRecords(paths), current_job_id(pid), lambda: _train(settings, paths, force_pretrain))
    if result.get("status") == "succeeded" and (tail := decide_tail(paths)).defer:  # ml_backend.training.tail
        result["tail"] = tail.to_dict()
        log.info("Project %s: after-publish work of %s deferred (%s).", pid, result.get("version"), tail.reason)
    else:
        after_publish(settings, paths, result)  # bulk pre-annotation of the new version (ml_backend.prelabel)
    return result


def _train(settings: Settings, paths: ProjectPaths, force_pretrain: bool) -> dict[str, Any]:
    durations: dict[str, float] = {}
    with timed_step(durations, "pull"):
        source = pull_project(settings, paths)
    try:
        return _train_pulled(settings, paths, force_pretrain, source, durations)
    finally:
        source.client.close()


def _train_pulled(settings: Settings, paths: ProjectPaths, force_pretrain: bool, source: ProjectSource,
                  durations: dict[str, float]) -> dict[str, Any]:
    pid = paths.project_id
    with timed_step(durations, "labels"):
        labels = consensus_labels(settings, source, paths)
    counts: dict[str, int] = {"tasks": len(source.tasks), "labelled": len(labels.result.labels),
                              "excluded": len(labels.result.excluded), "annotation_problems": len(labels.problems),
                              **labels.copy_counts(settings.train_on_prediction_copies)}
    skip = labels_shortfall(labels.result.labels, settings.min_labels_to_train)
    if skip is not None:
        log.info("Project %s skipped: %s", pid, skip)
        prepared = cold_start(settings, paths, source, labels, force_pretrain, counts, durations)
        return {"status": "skipped", "reason": skip, "counts": counts, "durations_s": durations, "cold_start": prepared}
    with timed_step(durations, "images"):
        images = sync_images(settings, paths, source)
    counts.update(images=len(images.paths), unreadable_images=len(images.failed))
    require_images(images, len(source.tasks))
    choice = choose_encoder(settings, paths, images, force_pretrain, durations)
    encoder, decision, pretrain_report, live = choice.encoder, choice.decision, choice.pretrain_report, choice.live
    previous = live if decision.pretrain and live is not None and live.version != encoder.version else None
    with timed_step(durations, "embed"):
        features, ok = embed_features(settings, paths, encoder, previous, images)  # (N, D) per source, (N,)
    counts["embedded"] = int(ok.sum())
    with timed_step(durations, "fit"):
        fit, reuse = fit_heads(settings, paths, source, labels, images, features, ok, encoder)
    counts["trained_on"] = len(fit.task_ids)
    served = published_encoder(fit, encoder, previous)
    with timed_step(durations, "neighbors"):  # the similarity index of the published encoder's embeddings
        source_of_served = FeatureSource.PREVIOUS if served is previous else FeatureSource.ENCODER
        counts.update(update_neighbors(settings, paths, source, images, served.version, features[source_of_served], ok))
    with timed_step(durations, "propagation_choice"):
        propagated = choose_propagation(settings, paths, fit, source.config.taxonomy, served.version)
    with timed_step(durations, "publish"):
        version = publish_version(settings, paths, source, labels, images, served, fit, decision, counts, reuse,
                                  pretrain_report, propagated)
    if decision.pretrain:  # only once the new encoder is live: a failed publish pretrains again
        write_pretrain_record(paths, len(images.paths), encoder.version)
        pending_run(paths, clear=True)
        clear_pretrain_request(paths)
    paths.start_encoder.unlink(missing_ok=True)  # the live version's encoder is the project's from now on
    tail = decide_tail(paths)  # a follow-up training already waits: it does the after-publish work
    cross_validated = not reuse.reuse
    if reuse.reuse and not tail.defer:  # the version is live; the cross-validation it skipped runs now
        with timed_step(durations, "cross_validation"):
            fit = cross_validate_after_publish(settings, paths, fit, features, source)
        cross_validated = True
    if cross_validated:  # a record only of a cross-validation that ran
        write_calibration(paths, fit.result.temperature, fit.result.metrics, served.version, version,
                          label_digests(fit.pairs), fit.candidate.recipe)
    emb = features[fit.candidate.features]  # (N, D) what the published heads read
    try:
        if not (tail := tail if tail.defer else decide_tail(paths)).defer:
            with timed_step(durations, "disagreements"):
                counts["flags"] = analyse_disagreements(settings, paths, source, labels, images, emb, ok, fit, version,
                                                         served.version)
    except Exception as exc:  # never unpublish a model for a report; say why in the log
        log.error("Project %s: disagreement analysis failed (model %s stays live): %s", pid, version, exc,
                  exc_info=not isinstance(exc, TaxomocoError))
        counts["flags"] = -1
    return {"status": "succeeded", "version": version, "counts": counts, "durations_s": durations,
            "pretrain": {**decision.to_dict(), "run": pretrain_report}, "calibration": reuse.to_dict(),
            "pull": source.pull, "model_choice": fit.choice, "tail": tail.to_dict()}
