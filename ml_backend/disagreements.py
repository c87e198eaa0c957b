"""Annotator disagreements of a Label Studio project: read annotations, save and serve the report, post flags.

Flow: the training job pulls every task with all annotations (``ls_client.iter_tasks``), turns them into
:class:`model.consensus.Annotation` with :func:`annotations_from_tasks`, trains on the consensus labels,
then calls :func:`save_report` with the consensus computed from the model's out-of-sample probabilities.
``GET /disagreements?project=ID`` answers :func:`load_report`; ``taxomoco disagreements --project ID``
runs :func:`run_cli` (JSON, CSV and an HTML page with thumbnails); :func:`post_flags` writes each flag once
as a comment on its task in Label Studio.

Which annotations count:
    * cancelled (``was_cancelled``) annotations give no label;
    * ``ground_truth: true`` annotations, then reviewed ones (an accepted review in ``review_result`` /
      ``reviews`` / ``reviewed``, as Label Studio Enterprise reports them) take precedence;
    * the annotator is ``completed_by`` (an id, or a dict with ``id`` / ``email``);
    * labels no longer in the label config are reported as problems and left out.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_backend.label_config import LabelConfig
from ml_backend.ls_json import parse_annotation
from model.consensus import Annotation, ConsensusResult
from model.errors import DataError

log = logging.getLogger(__name__)

REPORT_DIR = "disagreements"
REPORT_FILE = "report.json"


def _annotator_of(ann: Mapping[str, Any]) -> str:
    who = ann.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("id", who.get("email"))
    if who is None:
        who = ann.get("created_username") or "unknown"
    return str(who)


def _is_reviewed(ann: Mapping[str, Any]) -> bool:
    if ann.get("reviewed") is True:
        return True
    if str(ann.get("review_result") or "").lower() in ("accepted", "approved"):
        return True
    reviews = ann.get("reviews")
    if isinstance(reviews, Sequence) and not isinstance(reviews, str):
        return any(isinstance(r, Mapping) and r.get("accepted") is True for r in reviews)
    return False


def annotations_from_tasks(tasks: Iterable[Any], config: LabelConfig) -> tuple[list[Annotation], list[str]]:
    """The annotations of every task, one :class:`Annotation` per Label Studio annotation.

    Args:
        tasks: ``ls_client.TaskRecord`` objects (``id``, ``data``, ``annotations`` as Label Studio returns
            them) or plain task dicts with the same keys.
        config: the project's parsed label config.

    Returns:
        annotations: one per annotation; cancelled or empty ones have no paths (their task stays known and
            is reported as excluded when nothing else labels it).
        problems: one message per label that could not be used (unknown path, missing annotator ...).
    """
    out: list[Annotation] = []
    problems: list[str] = []
    for task in tasks:
        task_id = task["id"] if isinstance(task, Mapping) else task.id
        anns = task.get("annotations", []) if isinstance(task, Mapping) else task.annotations
        for ann in anns or []:
            if not isinstance(ann, Mapping):
                problems.append(f"task {task_id}: an annotation is not an object ({type(ann).__name__}); skipped.")
                continue
            annotator = _annotator_of(ann)
            if ann.get("was_cancelled"):
                out.append(Annotation(int(task_id), annotator, ()))
                continue
            parsed = parse_annotation(ann.get("result"), config)
            for path, reason in parsed.unknown:
                problems.append(f"task {task_id}, annotation {ann.get('id')} by {annotator}: {reason}")
            out.append(Annotation(
                item=int(task_id), annotator=annotator, paths=tuple(tuple(p) for p in parsed.paths),
                ground_truth=bool(ann.get("ground_truth")), reviewed=_is_reviewed(ann),
            ))
    return out, problems


# ----- the saved report -----------------------------------------------------------------------------------
def report_path(settings: Any, project_id: int) -> Path:
    """Where the training job saves a project's report: ``project_dir/disagreements/report.json``."""
    return Path(settings.project_dir(project_id)) / REPORT_DIR / REPORT_FILE


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_report(
    result: ConsensusResult, project_id: int, model_version: str | None = None, problems: Sequence[str] = ()
) -> dict:
    """The report dict: the consensus result's JSON plus project, model version and input problems."""
    data = result.to_json()
    data["project"] = int(project_id)
    data["model_version"] = model_version
    data["problems"] = list(problems) + data.get("problems", [])
    return data


def save_report(
    settings: Any, project_id: int, result: ConsensusResult, model_version: str | None = None,
    problems: Sequence[str] = (),
) -> Path:
    """Save the report where :func:`load_report` finds it (atomically). Returns the file."""
    path = report_path(settings, project_id)
    _write_atomic(path, json.dumps(build_report(result, project_id, model_version, problems), indent=1))
    return path


def load_report(settings: Any, project_id: int) -> dict:
    """The last saved report of a project (``GET /disagreements?project=ID``).

    Raises:
        DataError: no report yet (no training has finished), naming how to make one.
    """
    path = report_path(settings, project_id)
    if not path.is_file():
        raise DataError(
            f"No disagreement report for project {project_id} yet ({path} is missing): it is written after each "
            "training. Train the project (Train button in Label Studio) or run `taxomoco disagreements --project "
            f"{project_id}`."
        )
    return json.loads(path.read_text(encoding="utf-8"))
