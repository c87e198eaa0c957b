"""The training job of one Label Studio project: the same importable function for every scheduler.

:func:`train_project` takes plain arguments (a project id and the model directory), so the embedded
scheduler's child process and an RQ worker on another machine run exactly the same code. Steps:

1. pull the project from Label Studio (label config + every task with every annotation: Label Studio is
   the source of truth, a lost webhook only delays training; only changed tasks are read when a local copy
   allows, ``ml_backend.task_snapshot``);
2. consensus labels (``model.consensus``); too few labels or classes → *skipped* (recorded, not a failure);
3. images of all tasks, labelled or not, downloaded once into ``project_dir/images/<content hash>``;
4. the pretraining policy (:func:`decide_pretrain`): MoCo v2 pretraining on all images → a new encoder, or
   heads only on the live encoder;
5. embeddings through the per-encoder embedding cache (only missing images are computed);
6. heads fit with out-of-fold probabilities → a new model version published atomically (only when
   everything succeeded), old versions pruned;
7. disagreement analysis with the out-of-fold probabilities → report saved, flags posted to Label Studio
   (a failure there is logged and never unpublishes the model).

Start and outcome are written to the project's job record (``ml_backend.job_records``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from ml_backend.job_records import (
    JobRecords,
    clear_pretrain_request,
    pretrain_requested,
    read_pretrain_record,
    run_recorded,
    write_pretrain_record,
)
from ml_backend.calibration import ReuseDecision, decide_reuse, label_digests, read_calibration, write_calibration
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


def labels_shortfall(labels: dict[int, tuple[str, ...]], min_labels: int) -> str | None:
    """Why a project cannot be trained yet (a *skip* reason), or None when it can.

    Args:
        labels: consensus label path per task id.
        min_labels: ``settings.min_labels_to_train``.
    """
    missing = min_labels - len(labels)
    if missing > 0:
        return f"need {missing} more labels (have {len(labels)} labelled tasks, training starts at {min_labels})"
    top = sorted({path[0] for path in labels.values() if path})
    if len(top) < 2:
        return (f"need labels of at least 2 top-level classes (all {len(labels)} labelled tasks are "
                f"{top[0] if top else 'empty'!r}); label a task of another class")
    return None


# --------------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------------


WARM_IMPORTS: tuple[str, ...] = (
    "torch", "model.training", "model.bundle", "model.embed_cache", "model.encoder", "model.images",
    "model.consensus", "ml_backend.images", "ml_backend.ls_client", "ml_backend.label_config",
    "ml_backend.connections", "ml_backend.disagreements", "ml_backend.task_snapshot",
)
"""What a heads-only run imports (about 4 CPU-seconds: torch, torchvision, scipy); see :func:`warm_up`.
``model.pretrain`` (Lightning, 2-3 s more) is left to the runs that pretrain, which take minutes anyway."""


def warm_up() -> None:
    """Import everything a training run needs, so that a process waiting for its job starts it at once
    (the embedded scheduler's spare child calls this while idle)."""
    import importlib

    for name in WARM_IMPORTS:
        importlib.import_module(name)
    from ml_backend.ls_client import preload_sdk

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
        ``{"status": "succeeded"|"skipped", "version", "reason", "counts", "durations_s", "pretrain"}``.

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
        _pending_run(project_dir, clear=True)
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
            "pretrain": decision.to_dict(), "calibration": reuse.to_dict()}


# --------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------


@dataclass
class ProjectSource:
    """What Label Studio holds about a project: connection, client, parsed config, every task."""

    conn: Any  # ml_backend.connections.LSConnection
    client: Any  # ml_backend.ls_client.LabelStudioClient
    config: Any  # ml_backend.label_config.LabelConfig
    tasks: list[Any]  # ls_client.TaskRecord


def pull_project(settings: Settings, pid: int) -> ProjectSource:
    """Label config and all tasks with all annotations (Label Studio is the source of truth; only the tasks
    changed since the last pull are read when the local copy allows, see ``ml_backend.task_snapshot``)."""
    from ml_backend.connections import resolve
    from ml_backend.label_config import parse_label_config
    from ml_backend.ls_client import LabelStudioClient
    from ml_backend.task_snapshot import SNAPSHOT_FILE, pull_tasks

    conn = resolve(settings, pid)
    client = LabelStudioClient(conn.url, conn.api_key)
    project = client.get_project(pid)
    config = parse_label_config(project.label_config)
    pull = pull_tasks(client, pid, settings.project_dir(pid) / SNAPSHOT_FILE, project.label_config,
                      settings.tasks_full_pull_every_s)
    log.info("Project %s (%s): %d tasks (%s pull) from %s.", pid, project.title, len(pull.tasks), pull.kind.value,
             conn.url)
    return ProjectSource(conn, client, config, pull.tasks)


@dataclass
class Labels:
    """Consensus labels of a project and the annotations they came from."""

    annotations: list[Any]  # model.consensus.Annotation
    problems: list[str]
    policy: Any  # model.consensus.ConsensusPolicy
    result: Any  # model.consensus.ConsensusResult (labels: task id -> path)


def consensus_labels(settings: Settings, source: ProjectSource) -> Labels:
    """Consensus paths to train on, under the policy the settings give."""
    from ml_backend.disagreements import annotations_from_tasks
    from model.consensus import ConsensusPolicy, consensus

    annotations, problems = annotations_from_tasks(source.tasks, source.config)
    policy = ConsensusPolicy(min_annotators=settings.min_annotators, min_agreement=settings.min_agreement)
    policy.validate()
    result = consensus(annotations, source.config.taxonomy, policy)
    for problem in problems[:20]:
        log.warning("annotation problem: %s", problem)
    return Labels(annotations, problems, policy, result)


@dataclass
class ProjectImages:
    """The project's readable task images, stored once by content hash under ``project_dir/images``."""

    task_ids: list[int]  # tasks with a local image, in task order
    hashes: list[str]  # content hash of each
    paths: list[Path]  # local file of each
    failed: dict[int, str]  # task id -> why its image is missing


INDEX_FILE = "index.json"


def sync_images(settings: Settings, pid: int, source: ProjectSource, chunk: int = 256) -> ProjectImages:
    """Download the images of all tasks that are not stored yet (an image value is fetched once).

    The index ``images/index.json`` maps an image value to its content hash; an image changed behind an
    unchanged URL is therefore not seen again (re-import the task to change it). A download that is not an
    image, or has more pixels than ``IMAGE_MAX_PIXELS``, is refused from its header, as /predict refuses it.
    """
    from ml_backend.images import fetch_many
    from model.images import check_image_header, content_hash

    root = settings.project_dir(pid) / "images"
    root.mkdir(parents=True, exist_ok=True)
    try:
        index: dict[str, str] = json.loads((root / INDEX_FILE).read_text())
    except (FileNotFoundError, ValueError):
        index = {}
    key = source.config.image_key
    values: dict[int, str] = {}
    failed: dict[int, str] = {}
    for task in source.tasks:
        value = task.data.get(key) if isinstance(task.data, dict) else None
        if not isinstance(value, str) or not value:
            failed[task.id] = f"task data has no {key!r} image value"
        else:
            values[task.id] = value
    todo = [(tid, v) for tid, v in values.items() if v not in index or not (root / index[v]).exists()]
    headers = source.client.auth_headers()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="images", unit="img", disable=len(todo) < chunk)
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        for (tid, value), got in zip(part, fetch_many([v for _, v in part], settings, source.conn, headers)):
            if isinstance(got, Exception):
                failed[tid] = str(got)
                continue
            try:  # the serving limits apply to training too: such an image is neither trained on nor cached
                check_image_header(got, settings.image_max_pixels, name=f"the image of task {tid}")
            except DataError as exc:
                failed[tid] = str(exc)
                continue
            digest = content_hash(got)
            path = root / digest
            if not path.exists():
                tmp = root / f".{digest}.{os.getpid()}.tmp"
                tmp.write_bytes(got)
                os.replace(tmp, path)
            index[value] = digest
        if bar is not None:
            bar.update(len(part))
    _write_json(root / INDEX_FILE, index)
    task_ids = [tid for tid, v in values.items() if tid not in failed and v in index]
    hashes = [index[values[tid]] for tid in task_ids]
    if failed:
        log.warning("Project %s: %d task images unavailable, e.g. task %s: %s", pid, len(failed),
                    *next(iter(failed.items())))
    return ProjectImages(task_ids, hashes, [root / h for h in hashes], failed)


@dataclass
class Encoder:
    """An encoder: config, weights and version."""

    cfg: Any  # model.encoder.EncoderConfig
    state: dict[str, Any]  # backbone state_dict
    version: str


def live_encoder(settings: Settings, pid: int) -> Encoder | None:
    """The encoder of the live model version, or None before the first version."""
    from model.bundle import live_version, load_live

    root = settings.project_dir(pid) / "models"
    if live_version(root) is None:
        return None
    bundle = load_live(root)
    return Encoder(bundle.encoder_cfg, bundle.backbone_state, bundle.manifest.encoder_version)


def encoder_config(settings: Settings) -> Any:
    """The encoder config the settings ask for (``ENCODER_ARCH``, ``ENCODER_INPUT_SIZE``, ``ENCODER_INIT_WEIGHTS``)."""
    from model.encoder import EncoderConfig

    init = str(settings.init_weights) if settings.init_weights else None
    return EncoderConfig(arch=settings.arch, input_size=settings.input_size, init_weights=init)


def lightning_device(device: str) -> tuple[str, Any]:
    """Lightning ``(accelerator, devices)`` for a ``DEVICE`` setting: one device per job.

    ``auto`` → ("auto", 1); ``cpu`` → ("cpu", 1); ``cuda`` → ("gpu", 1); ``cuda:N`` → ("gpu", (N,)).
    """
    if device == "cpu":
        return "cpu", 1
    if device == "cuda":
        return "gpu", 1
    if device.startswith("cuda:"):
        return "gpu", (int(device.split(":", 1)[1]),)
    return "auto", 1


def _pending_run(project_dir: Path, clear: bool = False) -> Path:
    """The pretraining run directory of this project's unfinished pretraining (resumed after a crash)."""
    marker = project_dir / "jobs" / "pretrain_pending.json"
    if clear:
        marker.unlink(missing_ok=True)
        return project_dir / "pretrain"
    try:
        return Path(json.loads(marker.read_text())["out_dir"])
    except (FileNotFoundError, ValueError, KeyError):
        run = project_dir / "pretrain" / time.strftime("run-%Y%m%dT%H%M%S", time.gmtime())
        _write_json(marker, {"out_dir": str(run)})
        return run


def pretrain_encoder(settings: Settings, pid: int, images: ProjectImages, init: Encoder | None) -> Encoder:
    """MoCo v2 pretraining on all the project's images; resumes an interrupted run of this project."""
    from model.pretrain import PretrainConfig, pretrain

    cfg = encoder_config(settings)
    if init is not None and init.cfg != cfg:
        init = None  # the settings changed the architecture: start over
    accelerator, devices = lightning_device(settings.device)
    if settings.pretrain_devices != "1":  # several GPUs for one pretraining (DDP through Lightning)
        devices = -1 if settings.pretrain_devices == "all" else int(settings.pretrain_devices)
    batch = max(2, min(settings.pretrain_batch_size, len(images.paths)))
    pcfg = PretrainConfig(epochs=settings.pretrain_epochs, batch_size=batch, max_minutes=settings.pretrain_max_minutes,
                          memory_bank_size=max(2048, batch), accelerator=accelerator, devices=devices,
                          strategy=settings.pretrain_strategy)
    out_dir = _pending_run(settings.project_dir(pid))
    result = pretrain([str(p) for p in images.paths], cfg, pcfg, out_dir, resume=True,
                      init_state=init.state if init is not None else None)
    log.info("Project %s: pretrained %d epochs (%.0f img/s), encoder %s.", pid, result.epochs_done,
             result.images_per_second, result.encoder_version)
    return Encoder(cfg, result.backbone_state, result.encoder_version)


def embed_all(settings: Settings, pid: int, encoder: Encoder, images: ProjectImages) -> tuple[Any, Any]:
    """Embeddings of all images through the embedding cache; only missing ones are computed.

    Returns:
        ``(emb (N, D) float32, ok (N,) bool)`` in ``images`` order; ``ok`` is False for unreadable images.
    """
    from model.embed_cache import EmbeddingCache, embed_through_cache
    from model.embedder import Embedder
    from model.encoder import build_backbone

    backbone = build_backbone(encoder.cfg)
    backbone.load_state_dict(encoder.state)
    cache = EmbeddingCache(settings.project_dir(pid) / "cache", encoder.version, int(backbone.out_dim))
    embedder = Embedder(backbone, encoder.cfg, device=settings.device)
    emb, ok = embed_through_cache(embedder, cache, [str(p) for p in images.paths], images.hashes, progress=True)
    log.info("Project %s: %d embeddings, %d unreadable images.", pid, int(ok.sum()), int((~ok).sum()))
    return emb, ok


@dataclass
class Fit:
    """The heads fit and the tasks it was trained on (rows of ``oof_level_probs``)."""

    result: Any  # model.training.FitResult
    task_ids: list[int]
    pairs: list[tuple[str, tuple[str, ...]]]  # (content hash, path) training pairs
    rows: list[int]  # rows of the embeddings (images order) trained on


def fit_heads(settings: Settings, pid: int, source: ProjectSource, labels: Labels, images: ProjectImages, emb: Any,
              ok: Any, encoder: Encoder) -> tuple[Fit, ReuseDecision]:
    """Fit the heads on the consensus labels of readable images.

    With the encoder and nearly the same labels as the last cross-validation (``ml_backend.calibration``),
    only the final heads train and the last temperature is reused; otherwise the out-of-fold
    cross-validation runs first.
    """
    from model.heads import HeadsConfig
    from model.training import fit

    rows, task_ids, paths = [], [], []
    for i, tid in enumerate(images.task_ids):
        path = labels.result.labels.get(tid)
        if path is not None and ok[i]:
            rows.append(i)
            task_ids.append(tid)
            paths.append(tuple(path))
    skip = labels_shortfall(dict(zip(task_ids, paths)), 2)
    if skip is not None:
        raise DataError(f"after dropping tasks whose image is unavailable: {skip}.")
    pairs = [(images.hashes[i], p) for i, p in zip(rows, paths)]
    record = read_calibration(settings.project_dir(pid))
    reuse = decide_reuse(record, encoder.version, label_digests(pairs), settings.calibration_reuse_fraction)
    log.info("Project %s: calibration %s (%s).", pid, "reused" if reuse.reuse else "cross-validated first",
             reuse.reason)
    if reuse.reuse:
        assert record is not None
        result = fit(emb[rows], paths, source.config.taxonomy, HeadsConfig(), temperature=record.temperature)
        result.metrics = {**record.metrics, "n_labelled": len(rows),
                          "calibration": {"from_version": record.model_version, "n_labelled": record.n_labelled,
                                          "changed_fraction": reuse.changed_fraction}}
    else:
        result = fit(emb[rows], paths, source.config.taxonomy, HeadsConfig())
    return Fit(result, task_ids, pairs, rows), reuse


def cross_validate_after_publish(fit: Fit, emb: Any, source: ProjectSource) -> Fit:
    """The cross-validation a reused calibration skipped: out-of-fold probabilities for the disagreement flags
    and the temperature and metrics the next retrain reuses. The published heads stay as they are."""
    from model.heads import HeadsConfig
    from model.training import cross_validate

    paths = [p for _, p in fit.pairs]
    cv = cross_validate(emb[fit.rows], paths, source.config.taxonomy, HeadsConfig())
    result = dataclasses.replace(fit.result, temperature=cv.temperature, oof_level_probs=cv.oof_level_probs,
                                 oof_level_logits=cv.oof_level_logits, oof_predictions=cv.oof_predictions,
                                 metrics=dict(cv.metrics), labelled_index=cv.labelled_index, targets=cv.targets,
                                 fold_of=cv.fold_of)
    return dataclasses.replace(fit, result=result)


def publish_version(settings: Settings, pid: int, source: ProjectSource, labels: Labels, images: ProjectImages,
                    encoder: Encoder, fit: Fit, decision: PretrainDecision, counts: dict[str, int],
                    reuse: ReuseDecision | None = None) -> str:
    """Publish the new model version atomically, prune old ones; returns the version."""
    from model.bundle import data_fingerprint, prune, publish

    root = settings.project_dir(pid) / "models"
    extra = {"consensus": labels.result.policy_record(), "excluded": len(labels.result.excluded),
             "pretrained": decision.pretrain, "pretrain_decision": decision.to_dict(), "counts": dict(counts),
             "project_id": pid, "label_config_from_name": source.config.from_name,
             "calibration": reuse.to_dict() if reuse is not None else None}
    manifest = publish(root, source.config.taxonomy, encoder.cfg, encoder.state, fit.result.heads,
                       fit.result.temperature, fit.result.metrics, data_fingerprint(fit.pairs), extra,
                       counts=dict(counts))
    prune(root, keep=settings.keep_versions)
    log.info("Project %s: published model version %s.", pid, manifest.version)
    return str(manifest.version)


def analyse_disagreements(settings: Settings, pid: int, source: ProjectSource, labels: Labels,
                          images: ProjectImages, emb: Any, ok: Any, fit: Fit, version: str) -> int:
    """Consensus again with the model's out-of-sample opinion → report saved, flags posted; returns #flags.

    The model's opinion is out-of-sample for every task: out-of-fold probabilities for the tasks trained
    on, the final heads' probabilities for tasks that were not trained on (excluded or unlabelled).
    """
    import numpy as np
    import torch

    from ml_backend import disagreements
    from model.consensus import consensus

    level_probs: dict[int, list[Any]] = {}
    oof = fit.result.oof_level_probs  # per level (N_lab, K_k); empty when there were too few labels for folds
    if oof:
        for row, position in enumerate(np.asarray(fit.result.labelled_index)):
            level_probs[fit.task_ids[int(position)]] = [np.asarray(level[row]) for level in oof]  # (K_k,) each
    annotated = {a.item for a in labels.annotations}
    trained = set(fit.task_ids)  # the final heads saw these: their opinion would not be out-of-sample
    others = [i for i, tid in enumerate(images.task_ids) if ok[i] and tid in annotated and tid not in trained]
    if others:
        heads = fit.result.heads.eval()
        with torch.inference_mode():
            logits = heads(torch.as_tensor(emb[others], dtype=torch.float32))  # L × (M, K_k)
        probs = [torch.softmax(z / float(fit.result.temperature), dim=1).numpy() for z in logits]
        for j, i in enumerate(others):
            level_probs[images.task_ids[i]] = [p[j] for p in probs]
    result = consensus(labels.annotations, source.config.taxonomy, labels.policy, level_probs=level_probs)
    disagreements.save_report(settings, pid, result, model_version=version, problems=labels.problems)
    if settings.post_flags_to_label_studio:
        summary = disagreements.post_flags(settings, source.client, pid, result)
        log.info("Project %s: %d flags; shown in Label Studio: %s", pid, len(result.flags), summary)
    return len(result.flags)


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
