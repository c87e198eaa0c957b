"""The RQ job of bulk pre-annotation: an importable function of plain arguments (see ``ml_backend.prelabel.schedule``)."""

from __future__ import annotations

from typing import Any

from ml_backend.prelabel.writer import run_prelabel
from ml_backend.training.jobs import current_job_id, job_settings

__all__ = ["prelabel_project"]


def prelabel_project(project_id: int, model_dir: str) -> dict[str, Any]:
    """Write the live version's predictions for every unlabelled task of the project into Label Studio.

    Args:
        project_id: Label Studio project id.
        model_dir: root of all projects' data (``MODEL_DIR``).
    """
    settings = job_settings(model_dir)
    return run_prelabel(settings, settings.project(int(project_id)), job_id=current_job_id(int(project_id)))
