"""The training job's first step: the project from Label Studio (its label config and every task).

Label Studio is the source of truth; only the tasks changed since the last pull are read when the local copy
allows (``ml_backend.labelstudio.snapshot``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.connections import LSConnection, resolve
from ml_backend.labelstudio.label_config import LabelConfig, parse_label_config
from ml_backend.labelstudio.snapshot import pull_tasks
from ml_backend.labelstudio.tasks import TaskRecord
from ml_backend.paths import ProjectPaths
from ml_backend.settings import Settings
from ml_backend.training.records import utc_now

__all__ = ["ProjectSource", "pull_project"]

log = logging.getLogger(__name__)


@dataclass
class ProjectSource:
    """What Label Studio holds about a project: connection, client, parsed config, every task."""

    conn: LSConnection
    client: LabelStudioClient
    config: LabelConfig
    tasks: list[TaskRecord]
    pull: dict[str, Any] = field(default_factory=dict)  # {"kind": full|incremental, "read": n, "reason", "started_at"}


def pull_project(settings: Settings, paths: ProjectPaths) -> ProjectSource:
    """Label config and all tasks with all annotations of the project.

    ``pull["started_at"]`` (UTC ISO-8601, this machine's clock) is taken before Label Studio is asked anything: every
    annotation Label Studio had saved by then is in ``tasks`` (what "a version includes an annotation" means).
    """
    started_at = utc_now()
    start = time.monotonic()
    pid = paths.project_id
    conn = resolve(settings, pid)
    client = conn.client()
    project = client.get_project(pid)
    config = parse_label_config(project.label_config)
    project_s = time.monotonic() - start
    pull = pull_tasks(client, pid, paths.tasks_snapshot, project.label_config, settings.tasks_full_pull_every_s)
    tasks_s = time.monotonic() - start - project_s
    log.info("Project %s (%s): %d tasks (%s pull, %d read) from %s: project %.2f s, tasks %.2f s.", pid, project.title,
             len(pull.tasks), pull.kind.value, pull.read, conn.url, project_s, tasks_s)
    return ProjectSource(conn, client, config, pull.tasks,
                         {"kind": pull.kind.value, "read": pull.read, "reason": pull.reason, "started_at": started_at,
                          "project_s": round(project_s, 3), "tasks_s": round(tasks_s, 3)})
