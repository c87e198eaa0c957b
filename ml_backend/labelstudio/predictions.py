"""Predictions stored in Label Studio: bulk import, counts and deletion per model version, the project's pinned version.

Measured on Label Studio 1.23.2 (see ``docs/design.md``, "The labeling loop"):

* ``POST /api/projects/<id>/import/predictions`` takes a list of ``{"task", "result", "score", "model_version"}``
  and answers ``{"created": n}``; up to 500 items are written by one ``bulk_create`` (all or nothing). Label
  Studio does not validate taxonomy paths: the caller builds valid results (``ml_backend.labelstudio.results``).
* ``GET /api/projects/<id>/model-versions/`` answers ``{version: number of predictions}``;
  ``DELETE`` with ``{"model_version": v}`` deletes every prediction of ``v`` (and clears ``project.model_version``
  when it named ``v`` or the ML backend's title: pin first, clean up after) in one transaction that runs a
  per-prediction signal (the task's counters and the project summary): 8,000 predictions held SQLite's write lock
  for about 90 s on a 10,000-task project, and every annotation submitted meanwhile failed with "database is
  locked" (``bench/retrain_latency.py``, thread dumps of Label Studio). The clean-up therefore deletes one
  prediction per request (``DELETE /api/predictions/<id>/``, :func:`delete_version_predictions`): each is its own
  short transaction and Label Studio keeps answering its labelers.
* ``project.model_version`` decides which predictions the Data Manager's *Prediction score* column averages and
  which ones "Uncertainty sampling" orders by; it holds the ML backend's title once a backend is connected, so
  the column stays empty until it is set to a version whose predictions exist (``PATCH /api/projects/<id>/``).
* ``GET /api/predictions/?task=<id>`` lists one task's predictions (used only to resume after a crash).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.errors import LabelStudioError, LabelStudioNotFound

__all__ = [
    "IMPORT_CHUNK_MAX",
    "delete_model_version",
    "delete_version_predictions",
    "import_predictions",
    "model_version_counts",
    "pin_model_version",
    "project_model_version",
    "task_prediction_versions",
]

IMPORT_CHUNK_MAX = 500
"""Largest import Label Studio writes in one ``bulk_create`` (``PREDICTION_IMPORT_BATCH_SIZE``)."""


def import_predictions(client: LabelStudioClient, project_id: int, items: Sequence[Mapping[str, Any]]) -> int:
    """Write predictions in one request; returns how many Label Studio says it created.

    Args:
        client: the project's Label Studio.
        project_id: the project.
        items: ``{"task": id, "result": [...], "score": s, "model_version": v}`` each, at most
            :data:`IMPORT_CHUNK_MAX` (so that the import is one transaction).
    """
    if not items:
        return 0
    if len(items) > IMPORT_CHUNK_MAX:
        raise ValueError(f"import at most {IMPORT_CHUNK_MAX} predictions per request, got {len(items)}")
    answer = client.request("POST", f"/api/projects/{int(project_id)}/import/predictions",
                            f"import {len(items)} predictions into project {project_id}", json=list(items)).json()
    if not isinstance(answer, Mapping) or not isinstance(answer.get("created"), int):
        raise LabelStudioError(f"Label Studio answered the prediction import of project {project_id} without a "
                               "'created' count; is this Label Studio 1.x?")
    return int(answer["created"])


def model_version_counts(client: LabelStudioClient, project_id: int) -> dict[str, int]:
    """Number of predictions per model version in the project."""
    answer = client.request("GET", f"/api/projects/{int(project_id)}/model-versions/",
                            f"count the predictions of project {project_id} per model version").json()
    if not isinstance(answer, Mapping):
        raise LabelStudioError(f"Label Studio answered the model versions of project {project_id} with something "
                               "other than an object; is this Label Studio 1.x?")
    return {str(k): int(v) for k, v in answer.items() if isinstance(v, int)}


def delete_model_version(client: LabelStudioClient, project_id: int, version: str) -> int:
    """Delete every prediction of ``version`` in the project; returns how many were deleted."""
    answer = client.request("DELETE", f"/api/projects/{int(project_id)}/model-versions/",
                            f"delete the predictions of model version {version} in project {project_id}",
                            json={"model_version": str(version)}).json()
    return int(answer.get("deleted_predictions", 0)) if isinstance(answer, Mapping) else 0


def delete_version_predictions(client: LabelStudioClient, project_id: int, versions: Collection[str],
                               stop: Callable[[], bool] = lambda: False,
                               on_deleted: Callable[[str], None] = lambda version: None) -> dict[str, int]:
    """Delete every prediction of ``versions`` in the project, one ``DELETE /api/predictions/<id>/`` each, found on
    the project's task pages; returns how many were deleted per version.

    ``stop`` is asked before each deletion: when it answers True the clean-up ends there (what is left is found and
    deleted by a later call). ``on_deleted`` is told the version of each prediction deleted (progress). A prediction
    already gone when its turn comes (404) is skipped and not counted.
    """
    wanted = {str(v) for v in versions}
    deleted = {v: 0 for v in sorted(wanted)}
    if not wanted:
        return deleted
    for task in client.iter_tasks(project_id):
        for prediction in task.predictions:
            version, pred_id = str(prediction.get("model_version") or ""), prediction.get("id")
            if version not in wanted or not isinstance(pred_id, int):
                continue
            if stop():
                return deleted
            try:
                client.request("DELETE", f"/api/predictions/{pred_id}/",
                               f"delete prediction {pred_id} (model version {version}) of project {project_id}")
            except LabelStudioNotFound:  # deleted meanwhile (by a person, or with its task): nothing left to do
                continue
            deleted[version] += 1
            on_deleted(version)
    return deleted


def project_model_version(client: LabelStudioClient, project_id: int) -> str:
    """The project's ``model_version`` (the version the Data Manager's score column and uncertainty sampling use)."""
    answer = client.request("GET", f"/api/projects/{int(project_id)}/", f"read project {project_id}").json()
    return str(answer.get("model_version") or "") if isinstance(answer, Mapping) else ""


def pin_model_version(client: LabelStudioClient, project_id: int, version: str) -> None:
    """Set the project's ``model_version`` to ``version``."""
    client.request("PATCH", f"/api/projects/{int(project_id)}/",
                   f"set the model version of project {project_id} to {version}", json={"model_version": str(version)})


def task_prediction_versions(client: LabelStudioClient, task_id: int) -> list[str]:
    """The model versions of one task's predictions (one per prediction)."""
    answer = client.request("GET", "/api/predictions/", f"list the predictions of task {task_id}",
                            params={"task": int(task_id)}).json()
    if isinstance(answer, Mapping):
        answer = answer.get("results") or []
    return [str(p.get("model_version") or "") for p in answer if isinstance(p, Mapping)]
