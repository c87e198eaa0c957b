"""The one settings object of a taxomoco process, read once at start-up from env vars and CLI flags.

Every setting has an environment variable (names shared with label-studio-ml where one exists) and a
default documented here and in the README's table. Nothing else in the code base reads ``os.environ``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ml_backend.paths import ProjectPaths
from model.errors import ConfigError
from model.heads.candidates import parse_candidates
from model.neighbors import NEAR_DUPLICATE_THRESHOLD
from model.paired_gain import GainRule
from model.propagation_choice import ChoiceRule
from model.ssl.config import PretrainConfig
from model.ssl.plan import PRETRAIN_MIN_IMAGES
from model.ssl.recipe import RecipeKind

_PRETRAIN = PretrainConfig()  # the one source of the pretraining defaults

__all__ = ["Settings"]


def _env_name(name: str) -> str:
    return name.upper()


@dataclass(frozen=True)
class Settings:
    """All settings; field metadata carries the env var name and the help text.

    Build with :meth:`from_env` (env vars + overrides from CLI flags). Frozen: pass it down, never mutate.
    """

    # --- server -------------------------------------------------------------------------------------
    host: str = field(default="0.0.0.0", metadata={"env": "TAXOMOCO_HOST", "help": "Address the HTTP server binds."})
    port: int = field(default=9090, metadata={"env": "TAXOMOCO_PORT", "help": "HTTP port (Label Studio's ML backend URL)."})
    http_threads: int = field(default=32, metadata={"env": "TAXOMOCO_HTTP_THREADS", "help": "Application threads of the server (requests are read whole before a thread takes them)."})
    torch_threads: int = field(default=0, metadata={"env": "TORCH_THREADS", "help": "torch intra-op threads in the server and in training (0 = torch's default: all cores)."})
    predict_concurrency: int = field(default=2, metadata={"env": "PREDICT_CONCURRENCY", "help": "Model forwards run at once per server process (more requests wait)."})
    predict_load_wait_s: float = field(default=30.0, metadata={"env": "PREDICT_LOAD_WAIT_S", "help": "How long /predict waits for a project's model to finish loading before answering without predictions."})
    max_request_bytes: int = field(default=200_000_000, metadata={"env": "MAX_REQUEST_BYTES", "help": "Largest /predict (and POST /similar) body accepted."})
    small_request_max_bytes: int = field(default=5_000_000, metadata={"env": "SMALL_REQUEST_MAX_BYTES", "help": "Largest body of every other endpoint (/setup, /webhook, /train, ...): a label config and a webhook payload fit easily."})
    predict_max_pixels: int = field(default=200_000_000, metadata={"env": "PREDICT_MAX_PIXELS", "help": "Decoded pixels one /predict request may hold at once; images are decoded and embedded in batches below this."})
    webhook_requires_auth: bool | None = field(default=None, metadata={"env": "WEBHOOK_REQUIRE_AUTH", "help": "Require Basic auth on /webhook too; unset = on whenever Basic auth is set (the backend then registers its own Label Studio webhook with the header and removes the auto-created one)."})
    train_queue_max_projects: int = field(default=100, metadata={"env": "TRAIN_QUEUE_MAX_PROJECTS", "help": "Projects that may wait for training at once; events beyond are answered and dropped (Label Studio stays the source of truth)."})
    prometheus_multiproc_dir: Path | None = field(default=None, metadata={"env": "PROMETHEUS_MULTIPROC_DIR", "help": "prometheus_client's multiprocess mode: an empty directory shared by every server process on the machine (emptied before they start); /metrics then sums all of them."})
    log_level: str = field(default="INFO", metadata={"env": "LOG_LEVEL", "help": "Python logging level."})
    basic_auth_user: str | None = field(default=None, metadata={"env": "BASIC_AUTH_USER", "help": "HTTP Basic auth user required on every endpoint except /health (set the same in Label Studio's model connection)."})
    basic_auth_pass: str | None = field(default=None, metadata={"env": "BASIC_AUTH_PASS", "help": "HTTP Basic auth password."})

    # --- storage --------------------------------------------------------------------------------------
    model_dir: Path = field(default=Path("./taxomoco-data"), metadata={"env": "MODEL_DIR", "help": "Where model versions, embedding caches and job records live (per project sub-directory); a shared volume when workers run on other machines."})

    # --- Label Studio ---------------------------------------------------------------------------------
    label_studio_url: str | None = field(default=None, metadata={"env": "LABEL_STUDIO_URL", "help": "Base URL of Label Studio (recommended: then /setup's hostname is never used); else the hostname /setup sends is verified and pinned per project."})
    label_studio_api_key: str | None = field(default=None, metadata={"env": "LABEL_STUDIO_API_KEY", "help": "Legacy token or personal access token (JWT refresh token), used with LABEL_STUDIO_URL only; else the token Label Studio sends in /setup."})
    allow_private_setup_hosts: bool = field(default=False, metadata={"env": "ALLOW_PRIVATE_SETUP_HOSTS", "help": "Without LABEL_STUDIO_URL: accept a /setup hostname on a loopback or private address (off: such a backend should set LABEL_STUDIO_URL instead)."})

    # --- images ---------------------------------------------------------------------------------------
    allowed_image_hosts: tuple[str, ...] = field(default=(), metadata={"env": "ALLOWED_IMAGE_HOSTS", "help": "Comma-separated extra hosts images may be fetched from (Label Studio's own host is always allowed)."})
    local_files_root: Path | None = field(default=None, metadata={"env": "LOCAL_FILES_ROOT", "help": "Directory local image paths must lie under; unset forbids plain local paths."})
    allow_private_image_hosts: bool = field(default=False, metadata={"env": "ALLOW_PRIVATE_IMAGE_HOSTS", "help": "Let ALLOWED_IMAGE_HOSTS entries resolve to loopback or private addresses (an image server inside your network)."})
    image_max_bytes: int = field(default=50_000_000, metadata={"env": "IMAGE_MAX_BYTES", "help": "Largest image download accepted."})
    image_max_pixels: int = field(default=50_000_000, metadata={"env": "IMAGE_MAX_PIXELS", "help": "Largest decoded image (decompression-bomb guard)."})
    image_timeout_s: float = field(default=10.0, metadata={"env": "IMAGE_TIMEOUT_S", "help": "Connect+read timeout per image download."})
    image_fetch_threads: int = field(default=8, metadata={"env": "IMAGE_FETCH_THREADS", "help": "Parallel image downloads per /predict request."})

    # --- model and training ---------------------------------------------------------------------------
    device: str = field(default="auto", metadata={"env": "DEVICE", "help": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N."})
    arch: str = field(default="resnet18-half", metadata={"env": "ENCODER_ARCH", "help": "Backbone: resnet18 or resnet18-half (without ENCODER_INIT_WEIGHTS; with one, the file decides)."})
    input_size: int = field(default=0, metadata={"env": "ENCODER_INPUT_SIZE", "help": "Encoder input size in pixels; 0 = chosen from the images (32 for images of at most 48 px, else 64 on a CPU / 96 on a GPU, never above the images' median side)."})
    init_weights: Path | None = field(default=None, metadata={"env": "ENCODER_INIT_WEIGHTS", "help": "Optional local weights file (.safetensors/.pth) to start the encoder from, e.g. a torchvision ResNet-18 ImageNet state_dict (the file decides the architecture; MoCo continues from it on the project's images); nothing is downloaded."})
    pretrain_min_images: int = field(default=PRETRAIN_MIN_IMAGES, metadata={"env": "PRETRAIN_MIN_IMAGES", "help": "Projects with fewer images do not pretrain (measured: below ~500 images MoCo loses to plain pixel features); POST /train with pretrain forces it."})
    pretrain_epochs: int = field(default=_PRETRAIN.epochs, metadata={"env": "PRETRAIN_EPOCHS", "help": "Epoch cap of a pretraining run; the run is fitted to PRETRAIN_MAX_MINUTES and the number of images, and its schedule spans the fitted run."})
    pretrain_max_minutes: float = field(default=_PRETRAIN.max_minutes or 0.0, metadata={"env": "PRETRAIN_MAX_MINUTES", "help": "Time budget of one pretraining run (0 = only the epoch cap)."})
    pretrain_batch_size: int = field(default=_PRETRAIN.batch_size, metadata={"env": "PRETRAIN_BATCH_SIZE", "help": "MoCo batch size."})
    pretrain_lr: float = field(default=_PRETRAIN.lr, metadata={"env": "PRETRAIN_LR", "help": "MoCo SGD learning rate (after warm-up; cosine to 0 over the run)."})
    pretrain_temperature: float = field(default=_PRETRAIN.temperature, metadata={"env": "PRETRAIN_TEMPERATURE", "help": "InfoNCE temperature."})
    pretrain_memory_bank: int = field(default=_PRETRAIN.memory_bank_size, metadata={"env": "PRETRAIN_MEMORY_BANK", "help": "Largest MoCo memory bank (negatives); fitted down to the number of images."})
    pretrain_seed: int = field(default=_PRETRAIN.seed, metadata={"env": "PRETRAIN_SEED", "help": "Seed of pretraining (weights, augmentations, shuffling) and of the random weights a project starts from before any pretraining; another seed gives another, equally valid encoder."})
    pretrain_augment: str = field(default=RecipeKind.AUTO.value, metadata={"env": "PRETRAIN_AUGMENT", "help": "Augmentation recipe: auto (chosen from the images' size and colour), small-images, or moco-v2."})
    pretrain_devices: str = field(default="1", metadata={"env": "PRETRAIN_DEVICES", "help": "Devices one pretraining uses: a count, or `all` (every GPU the worker sees; with PRETRAIN_STRATEGY=ddp_spawn)."})
    pretrain_strategy: str = field(default="auto", metadata={"env": "PRETRAIN_STRATEGY", "help": "Lightning strategy of pretraining: auto, or ddp_spawn for data-parallel on several GPUs inside a worker (plain ddp re-launches the script: use it with `taxomoco pretrain`)."})
    repretrain_fraction: float = field(default=0.5, metadata={"env": "REPRETRAIN_NEW_FRACTION", "help": "Pretrain again when the project gained this fraction of new images since the last pretraining."})
    min_labels_to_train: int = field(default=4, metadata={"env": "MIN_LABELS_TO_TRAIN", "help": "Labelled tasks needed before the first training."})
    prefix_threshold: float = field(default=0.2, metadata={"env": "PREFIX_THRESHOLD", "help": "With leafsOnly=false: predict the deepest prefix whose probability reaches this (0.2: a leaf unless it is no better than a guess among its siblings; measured in bench/results/prefix_threshold.txt)."})
    tasks_full_pull_every_s: float = field(default=3600.0, metadata={"env": "TASKS_FULL_PULL_EVERY_S", "help": "A training run reads only the tasks changed since the last run; every this many seconds it reads all of them again."})
    calibration_reuse_fraction: float = field(default=0.1, metadata={"env": "CALIBRATION_REUSE_FRACTION", "help": "A heads-only retrain whose labels differ from the last cross-validated ones by at most this fraction publishes at once with the last model choice and calibration temperature (the cross-validation runs after publishing, or in the last training of a burst); 0 = always cross-validate first. 0.1: three labelers on 1,000 tasks change 2-5 % of the labels between two trainings (bench/results/retrain_latency.txt)."})
    model_candidates: tuple[str, ...] = field(default=("pixels+linear", "encoder+prototypes", "encoder+mlp", "previous-encoder+mlp"), metadata={"env": "MODEL_CANDIDATES", "help": "Models every training compares by cross-validated hierarchical F1 before publishing the best (comma-separated; a tie within 0.005 goes to the one listed first here): pixels+linear (downscaled pixels + colour statistics, logistic regression), encoder+prototypes (nearest class mean on the encoder's embeddings), encoder+mlp (MLP heads), previous-encoder+mlp (the live model's encoder when a training pretrained a new one)."})
    propagation_choice: str = field(default="one-se", metadata={"env": "PROPAGATION_CHOICE", "help": "Whether label propagation over the kNN graph (alone, or averaged with the heads) may replace the chosen heads once they train, scored on the same cross-validation folds with each fold's labels removed from the seeds: one-se (only when its mean per-fold gain in hierarchical F1 exceeds one standard error of the gains), mean (the higher mean wins), heads (never). one-se chosen with bench/label_propagation.py --choice on validation draws; the served version's manifest names it (extra.served_model)."})
    model_choice: str = field(default=GainRule.ONE_SE.value, metadata={"env": "MODEL_CHOICE", "help": "How the model choice treats a near tie between candidates, compared on the same cross-validation folds: one-se (a simpler candidate, earlier in MODEL_CANDIDATES' rank order, wins unless the best one's mean per-fold gain in hierarchical F1 over it exceeds one standard error of those paired gains and 0.005), mean (the highest mean wins unless within 0.005). one-se chosen with bench/model_choice.py on validation draws (test draws, 2 labels per animal on animal-mnist: regret against the best candidate 0.010 vs 0.021 leaf accuracy, picks worse than pixels+linear by over 5 points 2/20 vs 4/20; 5 per animal: 0.000 vs 0.021), at no extra cost; the choice and its rule are in /job_status (model_choice)."})
    cv_folds: int = field(default=3, metadata={"env": "CV_FOLDS", "help": "Cross-validation folds of the model choice and the calibration (stratified by label path; at most one per labelled task)."})
    keep_versions: int = field(default=5, metadata={"env": "KEEP_VERSIONS", "help": "Model versions kept per project (the live one always)."})

    # --- the labeling loop -------------------------------------------------------------------------------
    prelabel: bool = field(default=True, metadata={"env": "PRELABEL", "help": "After each new model version, write its predictions for every task without a human annotation into Label Studio (chunked, resumable), pin the project's model version to it, rank the tasks for labeling (GET /queue, the \"label next\" tab) and delete older versions' predictions."})
    prelabel_chunk: int = field(default=500, metadata={"env": "PRELABEL_CHUNK", "help": "Predictions written per Label Studio request (1-500: one import is one transaction in Label Studio)."})
    prelabel_keep_versions: int = field(default=2, metadata={"env": "PRELABEL_KEEP_VERSIONS", "help": "This backend's model versions whose predictions stay in Label Studio (the live one and the ones before it); older ones are deleted once the live version covers every unlabelled task."})
    cold_start_per_class: float = field(default=10.0, metadata={"env": "COLD_START_LABELS_PER_CLASS", "help": "Labels per leaf class (on average) below which the labeling order covers the embedding space (typical images of unlabelled clusters) before following the model's uncertainty (10: chosen with bench/labeling_session.py on validation seeds, where covering longer beat switching at 2 or 5)."})
    label_next_tab_tasks: int = field(default=100, metadata={"env": "LABEL_NEXT_TAB_TASKS", "help": "Tasks of the \"taxomoco: label next\" Data Manager tab (the head of the labeling order); 0 = no tab."})
    propagation: bool = field(default=True, metadata={"env": "PROPAGATION", "help": "Before the heads can train (from the first label until MIN_LABELS_TO_TRAIN labels of 2 top-level classes): spread the labels over the kNN graph of the embeddings and serve every task's propagated path as a prediction (version propagation-<labels>-<UTC stamp>-<hash>) in /predict and, with PRELABEL, written into Label Studio and ranking the labeling order; off: no predictions before the first model."})
    train_on_prediction_copies: bool = field(default=False, metadata={"env": "TRAIN_ON_PREDICTION_COPIES", "help": "Train on annotations that merely copy a prediction (\"Create annotations from predictions\", or a pre-annotation submitted unchanged within a second of opening the task); off: they are left out and counted in /job_status (counts.prediction_copies)."})

    # --- consensus (disagreements) ----------------------------------------------------------------------
    min_annotators: int = field(default=1, metadata={"env": "CONSENSUS_MIN_ANNOTATORS", "help": "Annotators a task needs before its consensus label is trained on."})
    min_agreement: float = field(default=0.0, metadata={"env": "CONSENSUS_MIN_AGREEMENT", "help": "Fraction of annotators agreeing needed to train on a task."})
    post_flags_to_label_studio: bool = field(default=True, metadata={"env": "POST_FLAGS_TO_LABEL_STUDIO", "help": "Show disagreement flags in Label Studio: Data Manager tabs per flag kind (every edition) and task comments where the edition has a comment API."})
    label_error_neighbours: bool = field(default=True, metadata={"env": "LABEL_ERROR_NEIGHBOURS", "help": "Label-error flags also weigh the neighbours' verdict: each trained task's label distribution propagated over the kNN graph of the embeddings from the other folds' labels (its own removed); a given label they contradict scores higher, one they confirm lower (bench/disagreements.py --propagation: label-error R-precision and AUROC up on validation and test seeds)."})
    near_duplicate_threshold: float = field(default=NEAR_DUPLICATE_THRESHOLD, metadata={"env": "NEAR_DUPLICATE_THRESHOLD", "help": "Cosine similarity of two images' embeddings from which they count as near-duplicates; 0 = calibrated for each encoder on the project's images (the similarity at most 0.5 % of them reach with their most similar other image, at most 0.9996; see docs/design.md); 1 = byte-identical images only."})

    # --- queue ----------------------------------------------------------------------------------------
    redis_url: str | None = field(default=None, metadata={"env": "REDIS_URL", "help": "Redis for the RQ training queue; unset = embedded trainer inside the server."})
    pretrain_queue: str = field(default="taxomoco-pretrain", metadata={"env": "PRETRAIN_QUEUE", "help": "RQ queue of heavy jobs (MoCo pretraining)."})
    heads_queue: str = field(default="taxomoco-heads", metadata={"env": "HEADS_QUEUE", "help": "RQ queue of light jobs (heads retraining)."})
    job_timeout_s: int = field(default=6 * 3600, metadata={"env": "JOB_TIMEOUT_S", "help": "RQ job timeout."})
    job_retries: int = field(default=2, metadata={"env": "JOB_RETRIES", "help": "Retries of a job whose worker died."})

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Read every field from ``env`` (default: the process environment), then apply CLI ``overrides``.

        Raises:
            ConfigError: a value that does not parse, naming the variable and the expected form.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for f in dataclasses.fields(cls):
            name = f.metadata["env"]
            if name in env and env[name] != "":
                values[f.name] = _parse(f, env[name], name)
        for key, value in overrides.items():
            if value is None:
                continue
            if key not in {f.name for f in dataclasses.fields(cls)}:
                raise ConfigError(f"Unknown setting {key!r}.")
            f = next(f for f in dataclasses.fields(cls) if f.name == key)
            values[key] = _parse(f, value, f"--{key.replace('_', '-')}") if isinstance(value, str) else value
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if bool(self.basic_auth_user) != bool(self.basic_auth_pass):
            raise ConfigError("Set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither.")
        if self.label_studio_api_key and not self.label_studio_url:
            raise ConfigError("LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL: the key would go to whatever host "
                              "/setup names. Set LABEL_STUDIO_URL to your Label Studio's base URL too.")
        if self.webhook_requires_auth and not self.basic_auth_user:
            raise ConfigError("WEBHOOK_REQUIRE_AUTH=true needs BASIC_AUTH_USER and BASIC_AUTH_PASS.")
        if min(self.max_request_bytes, self.small_request_max_bytes, self.predict_max_pixels,
               self.train_queue_max_projects) < 1:
            raise ConfigError("MAX_REQUEST_BYTES, SMALL_REQUEST_MAX_BYTES, PREDICT_MAX_PIXELS and "
                              "TRAIN_QUEUE_MAX_PROJECTS must be positive.")
        if self.arch not in ("resnet18", "resnet18-half"):
            raise ConfigError(f"ENCODER_ARCH={self.arch!r} is not supported; use resnet18 or resnet18-half.")
        if self.input_size != 0 and self.input_size < 16:
            raise ConfigError(f"ENCODER_INPUT_SIZE={self.input_size} is too small; use 0 (chosen from the images) or "
                              "at least 32.")
        if self.pretrain_augment not in {k.value for k in RecipeKind}:
            raise ConfigError(f"PRETRAIN_AUGMENT={self.pretrain_augment!r} is not a recipe; use one of "
                              f"{', '.join(k.value for k in RecipeKind)}.")
        if self.pretrain_max_minutes < 0 or self.pretrain_epochs < 1 or self.pretrain_min_images < 0:
            raise ConfigError("PRETRAIN_MAX_MINUTES must be >= 0 (0 = no budget), PRETRAIN_EPOCHS >= 1 and "
                              "PRETRAIN_MIN_IMAGES >= 0.")
        if self.pretrain_memory_bank < self.pretrain_batch_size or self.pretrain_batch_size < 2:
            raise ConfigError(f"PRETRAIN_MEMORY_BANK={self.pretrain_memory_bank} must be >= PRETRAIN_BATCH_SIZE="
                              f"{self.pretrain_batch_size} >= 2.")
        if self.pretrain_lr <= 0 or self.pretrain_temperature <= 0:
            raise ConfigError("PRETRAIN_LR and PRETRAIN_TEMPERATURE must be positive.")
        if self.torch_threads < 0 or self.predict_concurrency < 1:
            raise ConfigError("TORCH_THREADS must be >= 0 and PREDICT_CONCURRENCY >= 1.")
        if self.pretrain_devices != "all" and not self.pretrain_devices.isdigit():
            raise ConfigError(f"PRETRAIN_DEVICES={self.pretrain_devices!r}: use a number of devices or `all`.")
        if not 0.0 <= self.prefix_threshold <= 1.0:
            raise ConfigError("PREFIX_THRESHOLD must lie in [0, 1].")
        if not 0.0 <= self.near_duplicate_threshold <= 1.0:
            raise ConfigError(f"NEAR_DUPLICATE_THRESHOLD={self.near_duplicate_threshold} must lie in [0, 1]: it is a cosine "
                              "similarity (0 = calibrated for each encoder, 1 = byte-identical images only).")
        if self.tasks_full_pull_every_s < 0:
            raise ConfigError(f"TASKS_FULL_PULL_EVERY_S={self.tasks_full_pull_every_s} must be >= 0 (0 = always read "
                              "every task).")
        parse_candidates(self.model_candidates)
        if self.propagation_choice not in {r.value for r in ChoiceRule}:
            raise ConfigError(f"PROPAGATION_CHOICE={self.propagation_choice!r}: use one of "
                              f"{', '.join(r.value for r in ChoiceRule)}.")
        if self.model_choice not in {r.value for r in GainRule}:
            raise ConfigError(f"MODEL_CHOICE={self.model_choice!r}: use one of {', '.join(r.value for r in GainRule)}.")
        if self.cv_folds < 2:
            raise ConfigError(f"CV_FOLDS={self.cv_folds} must be at least 2; 3 keeps a training fast, 5 scores more "
                              "steadily.")
        if not 0.0 <= self.calibration_reuse_fraction < 1.0:
            raise ConfigError(f"CALIBRATION_REUSE_FRACTION={self.calibration_reuse_fraction} must lie in [0, 1); "
                              "0.1 reuses the calibration for changes of up to 10 % of the labels, 0 never.")
        if not 1 <= self.prelabel_chunk <= 500:
            raise ConfigError(f"PRELABEL_CHUNK={self.prelabel_chunk} must lie in 1..500 (Label Studio imports at most "
                              "500 predictions in one transaction).")
        if self.prelabel_keep_versions < 1:
            raise ConfigError(f"PRELABEL_KEEP_VERSIONS={self.prelabel_keep_versions} must be >= 1 (the live version's "
                              "predictions always stay).")
        if self.cold_start_per_class < 0 or not 0 <= self.label_next_tab_tasks <= 300:
            raise ConfigError("COLD_START_LABELS_PER_CLASS must be >= 0 and LABEL_NEXT_TAB_TASKS in 0..300 (a longer "
                              "task filter makes the Data Manager slow).")

    @property
    def webhook_auth(self) -> bool:
        """Whether /webhook requires Basic auth: WEBHOOK_REQUIRE_AUTH, by default on exactly when Basic auth is set."""
        return bool(self.basic_auth_user) if self.webhook_requires_auth is None else self.webhook_requires_auth

    def project(self, project_id: int) -> ProjectPaths:
        """The files and folders of one Label Studio project under ``model_dir``."""
        return ProjectPaths(self.model_dir, int(project_id))

    @staticmethod
    def flag_help(name: str) -> tuple[str, object]:
        """``(help text with its env var and default, default)`` of setting ``name``: the CLI's flags read their
        documentation and default here, so a flag and its env var mean the same thing."""
        f = next(f for f in dataclasses.fields(Settings) if f.name == name)
        return f"{f.metadata['help']} [env {f.metadata['env']}; default {_show(f.default)}]", f.default

    @staticmethod
    def describe() -> list[tuple[str, str, str]]:
        """(env var, default, help) for every setting: the README's settings table."""
        return [(f.metadata["env"], _show(f.default), f.metadata["help"]) for f in dataclasses.fields(Settings)]


def _show(default: object) -> str:
    if default is None or default == ():
        return "unset"
    if isinstance(default, Path):
        return str(default)
    if isinstance(default, tuple):
        return ",".join(str(x) for x in default)
    return str(default).lower() if isinstance(default, bool) else str(default)


def _parse(f: dataclasses.Field, raw: object, name: str) -> object:
    text = str(raw).strip()
    kind = str(f.type)
    try:
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
        if kind.startswith("bool"):
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind.startswith("Path"):
            return Path(text).expanduser()
        if kind.startswith("tuple"):
            return tuple(h.strip() for h in text.split(",") if h.strip())
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind}; {f.metadata['help']}") from None
    return text
