"""Where everything of one Label Studio project lives under ``MODEL_DIR``: the one place the layout is spelled.

::

    MODEL_DIR/project-<id>/
        models/                 model versions (``model.bundle``: LIVE, versions/, encoders/)
        cache/                  embeddings per content hash and encoder version (``model.encoder.cache``)
        images/                 task images by content hash; images/index.json maps image URLs to hashes
        pretrain/run-*/         pretraining runs (checkpoints, loss curve)
        tasks.json              the tasks as last pulled from Label Studio (``labelstudio.snapshot``)
        connection.json         where this project's Label Studio is, and its token (mode 0600)
        jobs/                   job records: status.json (+ .lock), pretrain.json, pretrain_requested,
                                pretrain_pending.json, calibration.json, prelabel.json (bulk pre-annotation
                                progress and resume cursor)
        labeling_queue.json     the labeling order ``GET /queue`` serves (``ml_backend.prelabel``)
        start_encoder.safetensors  the encoder used before the first model version (cold start, label
                                propagation; ``training.encoder``), which the first training continues from
        propagation/            label propagation before the heads train: LIVE (the version served),
                                <version>.json (each task's propagated path) and knn-<encoder>.npz (the kNN
                                graph, extended by the next run; ``training.propagation``)
        prediction_copies.json  annotations seen to copy a prediction (``labelstudio.copies``)
        disagreements/          report.json, model_probs.npz, posted.json and the CLI's CSV/HTML files
        neighbors/              <encoder_version>/ kNN index per encoder (``model.neighbors.index``), tasks.json
                                (task id -> content hash, image), duplicates.json

Shared by the server, the embedded trainer's child processes and RQ workers on other machines (the same
``MODEL_DIR`` volume). Nothing is created by reading a path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

__all__ = ["ProjectPaths"]


@dataclass(frozen=True)
class ProjectPaths:
    """The files and folders of one project.

    Args:
        model_dir: ``MODEL_DIR``.
        project_id: the Label Studio project id (a positive integer).
    """

    model_dir: Path
    project_id: int

    PREFIX: ClassVar[str] = "project-"

    @property
    def root(self) -> Path:
        """``MODEL_DIR/project-<id>``."""
        return Path(self.model_dir) / f"{self.PREFIX}{int(self.project_id)}"

    # ----- models and caches -------------------------------------------------------------------------
    @property
    def models(self) -> Path:
        """The ``model.bundle`` root: ``LIVE``, ``versions/``, ``encoders/``."""
        return self.root / "models"

    @property
    def cache(self) -> Path:
        """The embedding cache (one file set per encoder version)."""
        return self.root / "cache"

    @property
    def images(self) -> Path:
        """Task images stored once by content hash."""
        return self.root / "images"

    @property
    def images_index(self) -> Path:
        """Image URL (with its origin) -> content hash of the stored image."""
        return self.images / "index.json"

    @property
    def pretrain_runs(self) -> Path:
        """Pretraining run directories (checkpoints, ``loss.csv``, ``loss.png``)."""
        return self.root / "pretrain"

    # ----- Label Studio -------------------------------------------------------------------------------
    @property
    def tasks_snapshot(self) -> Path:
        """The project's tasks as last pulled from Label Studio."""
        return self.root / "tasks.json"

    @property
    def connection(self) -> Path:
        """Where this project's Label Studio is, and its token (mode 0600)."""
        return self.root / "connection.json"

    # ----- job records --------------------------------------------------------------------------------
    @property
    def jobs(self) -> Path:
        """Job records of the project."""
        return self.root / "jobs"

    @property
    def job_status(self) -> Path:
        """Queued / running / last outcomes (``ml_backend.training.records``)."""
        return self.jobs / "status.json"

    @property
    def job_lock(self) -> Path:
        """The ``flock`` guarding read-modify-write of :attr:`job_status`."""
        return self.jobs / "status.lock"

    @property
    def pretrain_record(self) -> Path:
        """The last published pretraining (images, encoder version)."""
        return self.jobs / "pretrain.json"

    @property
    def pretrain_request(self) -> Path:
        """Present while a pretraining was asked for and not yet published."""
        return self.jobs / "pretrain_requested"

    @property
    def pretrain_pending(self) -> Path:
        """The run directory of an unfinished pretraining (resumed after a crash)."""
        return self.jobs / "pretrain_pending.json"

    @property
    def calibration(self) -> Path:
        """The last cross-validation's temperature and the labels it saw."""
        return self.jobs / "calibration.json"

    @property
    def prelabel(self) -> Path:
        """Bulk pre-annotation of the live version: progress and resume cursor (``ml_backend.prelabel``)."""
        return self.jobs / "prelabel.json"

    @property
    def labeling_queue(self) -> Path:
        """The ranked labeling order written with the last bulk pre-annotation (``GET /queue``)."""
        return self.root / "labeling_queue.json"

    @property
    def start_encoder(self) -> Path:
        """The encoder of a project without a model version yet (weights + config in one safetensors file)."""
        return self.root / "start_encoder.safetensors"

    @property
    def propagation(self) -> Path:
        """Propagated predictions before the heads train: ``LIVE`` and one JSON file per version."""
        return self.root / "propagation"

    @property
    def prediction_copies(self) -> Path:
        """Annotations seen to copy a prediction, remembered across pulls (``ml_backend.labelstudio.copies``)."""
        return self.root / "prediction_copies.json"

    # ----- disagreements ------------------------------------------------------------------------------
    @property
    def disagreements(self) -> Path:
        """The disagreement report and the files the CLI writes next to it."""
        return self.root / "disagreements"

    @property
    def disagreement_report(self) -> Path:
        """The report ``GET /disagreements`` serves."""
        return self.disagreements / "report.json"

    @property
    def model_probs(self) -> Path:
        """The model's out-of-sample probabilities behind the last report."""
        return self.disagreements / "model_probs.npz"

    @property
    def posted_flags(self) -> Path:
        """Keys of the flags already posted to Label Studio as comments."""
        return self.disagreements / "posted.json"

    # ----- similarity ---------------------------------------------------------------------------------
    @property
    def neighbors(self) -> Path:
        """Nearest-neighbour indexes (one per encoder version), the task map and the duplicate groups."""
        return self.root / "neighbors"

    def neighbor_index(self, encoder_version: str) -> Path:
        """The kNN index directory of one encoder's embeddings (``model.neighbors.index``)."""
        if not encoder_version or "/" in encoder_version or encoder_version.startswith("."):
            raise ValueError(f"encoder version {encoder_version!r} cannot name a directory")
        return self.neighbors / encoder_version

    @property
    def neighbor_tasks(self) -> Path:
        """Task id -> content hash and image value of every indexed task, as of the last training."""
        return self.neighbors / "tasks.json"

    @property
    def duplicates(self) -> Path:
        """The duplicate groups of the last training (``GET /duplicates``)."""
        return self.neighbors / "duplicates.json"

    # ----- all projects -------------------------------------------------------------------------------
    @classmethod
    def project_ids(cls, model_dir: Path) -> list[int]:
        """Ids of the projects that have a directory under ``model_dir``, ascending."""
        try:
            names = [p.name for p in Path(model_dir).iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []
        ids = [n[len(cls.PREFIX):] for n in names if n.startswith(cls.PREFIX)]
        return sorted(int(i) for i in ids if i.isdigit() and i.isascii())
