"""The training job's data steps: the project from Label Studio, its consensus labels, its stored images.

Used by :func:`ml_backend.training.jobs.train_project` (and the disagreement CLI, which pulls the same way).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml_backend.settings import Settings
from model.errors import DataError

log = logging.getLogger(__name__)


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


@dataclass
class ProjectSource:
    """What Label Studio holds about a project: connection, client, parsed config, every task."""

    conn: Any  # ml_backend.labelstudio.connections.LSConnection
    client: Any  # ml_backend.labelstudio.client.LabelStudioClient
    config: Any  # ml_backend.labelstudio.label_config.LabelConfig
    tasks: list[Any]  # ls_client.TaskRecord
    pull: dict[str, Any] = field(default_factory=dict)  # {"kind": full|incremental, "read": n, "reason": ...}


def pull_project(settings: Settings, pid: int) -> ProjectSource:
    """Label config and all tasks with all annotations (Label Studio is the source of truth; only the tasks
    changed since the last pull are read when the local copy allows, see ``ml_backend.labelstudio.snapshot``)."""
    from ml_backend.labelstudio.connections import resolve
    from ml_backend.labelstudio.label_config import parse_label_config
    from ml_backend.labelstudio.client import LabelStudioClient
    from ml_backend.labelstudio.snapshot import SNAPSHOT_FILE, pull_tasks

    conn = resolve(settings, pid)
    client = LabelStudioClient(conn.url, conn.api_key)
    project = client.get_project(pid)
    config = parse_label_config(project.label_config)
    pull = pull_tasks(client, pid, settings.project_dir(pid) / SNAPSHOT_FILE, project.label_config,
                      settings.tasks_full_pull_every_s)
    log.info("Project %s (%s): %d tasks (%s pull) from %s.", pid, project.title, len(pull.tasks), pull.kind.value,
             conn.url)
    return ProjectSource(conn, client, config, pull.tasks,
                         {"kind": pull.kind.value, "read": pull.read, "reason": pull.reason})


@dataclass
class Labels:
    """Consensus labels of a project and the annotations they came from."""

    annotations: list[Any]  # model.crowd.consensus.Annotation
    problems: list[str]
    policy: Any  # model.crowd.consensus.ConsensusPolicy
    result: Any  # model.crowd.consensus.ConsensusResult (labels: task id -> path)


def consensus_labels(settings: Settings, source: ProjectSource) -> Labels:
    """Consensus paths to train on, under the policy the settings give."""
    from ml_backend.training.disagreements import annotations_from_tasks
    from model.crowd.consensus import ConsensusPolicy, consensus

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
    from ml_backend.net.images import fetch_many
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
    write_json(root / INDEX_FILE, index)
    task_ids = [tid for tid, v in values.items() if tid not in failed and v in index]
    hashes = [index[values[tid]] for tid in task_ids]
    if failed:
        log.warning("Project %s: %d task images unavailable, e.g. task %s: %s", pid, len(failed),
                    *next(iter(failed.items())))
    return ProjectImages(task_ids, hashes, [root / h for h in hashes], failed)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)
