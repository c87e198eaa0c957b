"""``taxomoco disagreements --project ID``: the disagreement report of a project as JSON, CSV and an HTML page.

Pulls the project from Label Studio, recomputes the consensus with the model's saved out-of-sample opinion
and writes the files (by default into ``ProjectPaths.disagreements``, whose report ``GET /disagreements`` serves).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.labelstudio.annotations import annotations_from_tasks
from ml_backend.net.images import ImageFetcher
from ml_backend.reports.disagreement_html import thumbnail_png, write_csvs, write_html
from ml_backend.settings import Settings
from ml_backend.training.disagreements import build_report, load_model_probs, load_report
from ml_backend.training.neighbors import duplicate_conflicts
from ml_backend.training.pull import pull_project
from model.atomic import atomic_write_json
from model.crowd.consensus import consensus
from model.crowd.types import ConsensusPolicy
from model.images import load_image
from model.taxonomy import Taxonomy

__all__ = ["run_cli"]

log = logging.getLogger(__name__)


def run_cli(settings: Settings, project_id: int, out_dir: Path | None = None, max_thumbnails: int = 200
            ) -> dict[str, Any]:
    """``taxomoco disagreements --project ID``: pull the project, recompute the consensus, write the files.

    The model's opinion is the out-of-sample probabilities the last training saved next to its report
    (none before the first training). Writes ``report.json``, ``review.csv``, ``flags.csv``, ``items.csv``,
    ``annotators.csv`` and ``report.html`` (thumbnails of the first ``max_thumbnails`` review entries) to
    ``out_dir`` (default: the project's ``disagreements/`` folder, whose report ``GET /disagreements`` serves).

    Returns:
        ``{"project", "out_dir", "files", "summary"}``.
    """
    paths = settings.project(project_id)
    source = pull_project(settings, paths)
    annotations, problems = annotations_from_tasks(source.tasks, source.config)
    policy = ConsensusPolicy(min_annotators=settings.min_annotators, min_agreement=settings.min_agreement)
    saved_dir = paths.disagreements
    level_probs = _usable_probs(load_model_probs(paths), source.config.taxonomy, problems)
    result = consensus(annotations, source.config.taxonomy, policy, level_probs=level_probs)
    version = None
    if level_probs and paths.disagreement_report.is_file():
        version = load_report(paths).get("model_version")
    report = build_report(result, project_id, version, problems, duplicate_conflicts(paths, result))

    out = Path(out_dir) if out_dir is not None else saved_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [atomic_write_json(out / paths.disagreement_report.name, report, indent=1)]
    files += write_csvs(report, out)

    tasks = {t.id: t for t in source.tasks}
    wanted = [e["item"] for e in report["review"][:max_thumbnails] if e["item"] in tasks]
    values = [str(tasks[t].data.get(source.config.image_key, "")) for t in wanted]
    thumbs: dict[int, bytes] = {}
    for task, got in zip(wanted, ImageFetcher(settings, source.client).fetch_many(values)):
        if isinstance(got, Exception):
            log.info("no thumbnail for task %s: %s", task, got)
            continue
        try:
            thumbs[task] = thumbnail_png(load_image(got, settings.image_max_pixels))
        except Exception as exc:  # per-image boundary: one bad image must not stop the report
            log.info("no thumbnail for task %s: %s", task, exc)
    task_url = f"{source.conn.url}/projects/{int(project_id)}/data?task={{task}}"
    files.append(write_html(report, out / "report.html", thumbs, task_url=task_url, limit=max_thumbnails))
    return {"project": int(project_id), "out_dir": str(out), "files": [str(f) for f in files],
            "summary": report["summary"]}


def _usable_probs(probs: dict[int, list[np.ndarray]] | None, taxonomy: Taxonomy, problems: list[str]
                  ) -> dict[int, list[np.ndarray]] | None:
    """The saved probabilities when they fit the current taxonomy; else None with a problem noted."""
    if not probs:
        return None
    first = next(iter(probs.values()))
    shape = [len(p) for p in first]
    expected = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    if shape != expected:
        problems.append(
            f"The saved model probabilities have {shape} classes per level but the label config now has {expected}; "
            "they are ignored until the next training."
        )
        return None
    return probs
