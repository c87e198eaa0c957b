"""The training job's image step: every task's image downloaded once and stored by content hash.

``ProjectPaths.images`` holds one file per distinct image (named by its sha256); ``images/index.json`` maps an
image URL — made absolute with the project's Label Studio origin — to the hash of what it gave, so a later run
fetches only new values, and a project moved to another Label Studio never reuses the old origin's images.
The serving limits apply:
an image that is not an image, or has more pixels than ``IMAGE_MAX_PIXELS``, is refused from its header.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ml_backend.net.images import ImageFetcher
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.pull import ProjectSource
from model.atomic import atomic_write_bytes, atomic_write_json
from model.errors import DataError
from model.images import check_image_header, content_hash

__all__ = ["ProjectImages", "require_images", "sync_images"]

log = logging.getLogger(__name__)


@dataclass
class ProjectImages:
    """The project's readable task images, stored once by content hash under ``ProjectPaths.images``."""

    task_ids: list[int]  # tasks with a local image, in task order
    hashes: list[str]  # content hash of each
    paths: list[Path]  # local file of each
    failed: dict[int, str]  # task id -> why its image is missing


def sync_images(settings: Settings, paths: ProjectPaths, source: ProjectSource, chunk: int = 256) -> ProjectImages:
    """Download the images of all tasks that are not stored yet (an image value is fetched once, however many
    tasks show it).

    The index ``images/index.json`` maps an image value to its content hash; an image changed behind an
    unchanged URL is therefore not seen again (re-import the task to change it). A download that is not an
    image, or has more pixels than ``IMAGE_MAX_PIXELS``, is refused from its header, as /predict refuses it.
    """
    pid = paths.project_id
    root = paths.images
    root.mkdir(parents=True, exist_ok=True)
    try:
        index: dict[str, str] = json.loads(paths.images_index.read_text())
    except (FileNotFoundError, ValueError):
        index = {}
    fetcher = ImageFetcher(settings, source.client)
    image_key = source.config.image_key
    values: dict[int, str] = {}  # task id -> image value
    keys: dict[int, str] = {}  # task id -> index key (the value made absolute with the project's origin)
    failed: dict[int, str] = {}
    for task in source.tasks:
        value = task.data.get(image_key) if isinstance(task.data, dict) else None
        if not isinstance(value, str) or not value:
            failed[task.id] = f"task data has no {image_key!r} image value"
        else:
            values[task.id], keys[task.id] = value, fetcher.key(value)
    by_key: dict[str, list[int]] = {}  # index key -> tasks showing that image (a repeated URL is fetched once)
    for tid, key in keys.items():
        by_key.setdefault(key, []).append(tid)
    todo = [key for key, tids in by_key.items() if key not in index or not (root / index[key]).exists()]
    bar = tqdm(total=len(todo), desc="images", unit="img", disable=len(todo) < chunk)
    for start in range(0, len(todo), chunk):
        part = todo[start:start + chunk]
        for key, got in zip(part, fetcher.fetch_many([values[by_key[k][0]] for k in part])):
            tids = by_key[key]
            if isinstance(got, Exception):
                failed.update((tid, str(got)) for tid in tids)
                continue
            try:  # the serving limits apply to training too: such an image is neither trained on nor cached
                check_image_header(got, settings.image_max_pixels, name=f"the image of task {tids[0]}")
            except DataError as exc:
                failed.update((tid, str(exc)) for tid in tids)
                continue
            digest = content_hash(got)
            path = root / digest
            if not path.exists():
                atomic_write_bytes(path, got)
            index[key] = digest
        bar.update(len(part))
    bar.close()
    atomic_write_json(paths.images_index, index)
    task_ids = [tid for tid in values if tid not in failed and keys[tid] in index]
    hashes = [index[keys[tid]] for tid in task_ids]
    if failed:
        log.warning("Project %s: %d task images unavailable, e.g. task %s: %s", pid, len(failed),
                    *next(iter(failed.items())))
    return ProjectImages(task_ids, hashes, [root / h for h in hashes], failed)


def require_images(images: ProjectImages, n_tasks: int) -> None:
    """Stop a run that could read no image at all, naming the first error and what to check.

    Raises:
        DataError: ``images`` holds no image.
    """
    if not images.paths:
        first = next(iter(images.failed.values()), "no image values")
        raise DataError(f"none of the {n_tasks} tasks' images could be fetched (first error: {first}); "
                        "check LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY, ALLOWED_IMAGE_HOSTS and LOCAL_FILES_ROOT.")
