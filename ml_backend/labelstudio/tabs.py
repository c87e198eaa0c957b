"""Data Manager tabs the backend creates in a project: flagged tasks, duplicates, "label next", "similar to N".

Tabs are the one way to show a list of tasks to every user in every Label Studio edition. A tab made here looks
like one the Data Manager makes itself: its hidden columns come from Label Studio's own column defaults
(``GET /api/dm/columns``), so thumbnails and the usual columns render, with the prediction score shown. A
project whose Data Manager was never opened has no tab at all, and its first tab becomes the default one
("Label All Tasks" would then stream it); so before the first tab of its own the backend creates Label Studio's
"Default" tab the way the Data Manager does. Task-id filters are an OR of ``equal`` filters (an ``in_list``
filter works on the API but breaks the Data Manager's UI for the whole project).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ml_backend.labelstudio.client import LabelStudioClient

__all__ = ["DEFAULT_TAB_TITLE", "ensure_default_tab", "list_tabs", "tab_data", "tab_task_ids", "upsert_task_tab"]

DEFAULT_TAB_TITLE = "Default"
_TASK_ID_FILTER = "filter:tasks:id"
SHOWN_COLUMNS = ("tasks:predictions_score",)
"""Columns the backend's tabs show although Label Studio hides them by default."""


def list_tabs(client: LabelStudioClient, project_id: int) -> list[dict[str, Any]]:
    """The project's Data Manager tabs (``id``, ``order``, ``data.title``, ``data.filters`` ...)."""
    answer = client.request("GET", "/api/dm/views/", f"list the Data Manager tabs of project {project_id}",
                            params={"project": int(project_id)}).json()
    return [dict(t) for t in answer if int(t.get("project", project_id)) == int(project_id)]


def _hidden_columns(client: LabelStudioClient, project_id: int) -> dict[str, list[str]]:
    """Columns hidden by default in each Data Manager mode, as the Data Manager computes them."""
    answer = client.request("GET", "/api/dm/columns", f"read the Data Manager columns of project {project_id}",
                            params={"project": int(project_id)}).json()
    columns = answer.get("columns", []) if isinstance(answer, Mapping) else answer
    hidden: dict[str, list[str]] = {"explore": [], "labeling": []}
    for column in columns:
        defaults = column.get("visibility_defaults") or {}
        name = f"{column.get('target', 'tasks')}:{column['id']}"
        parent = column.get("parent")
        if parent:
            name = f"{column.get('target', 'tasks')}:{parent}.{column['id']}"
        for mode in hidden:
            if defaults.get(mode) is False:
                hidden[mode].append(name)
    return hidden


def tab_data(client: LabelStudioClient, project_id: int, title: str, filters: Mapping[str, Any] | None = None,
             ordering: Sequence[str] = (), shown: Sequence[str] = ()) -> dict[str, Any]:
    """A tab's ``data`` as the Data Manager writes it (columns, widths, grid), with our title, filters, ordering;
    ``shown`` names more columns to show in both modes (e.g. ``tasks:data.image``, the image thumbnail)."""
    hidden = _hidden_columns(client, project_id)
    hidden["explore"] = [c for c in hidden["explore"] if c not in SHOWN_COLUMNS and c not in shown]
    hidden["labeling"] = [c for c in hidden["labeling"] if c not in shown]
    return {"title": str(title), "ordering": list(ordering), "type": "list", "target": "tasks",
            "filters": dict(filters or {"conjunction": "and", "items": []}), "hiddenColumns": hidden,
            "columnsWidth": {}, "columnsDisplayType": {}, "gridWidth": 4, "gridFitImagesToWidth": False,
            "semantic_search": [], "agreement_selected": {}}


def ensure_default_tab(client: LabelStudioClient, project_id: int) -> None:
    """Create Label Studio's own "Default" tab first when the project has no tab yet (else ours would be the default)."""
    if list_tabs(client, project_id):
        return
    data = tab_data(client, project_id, DEFAULT_TAB_TITLE)
    data["hiddenColumns"] = _hidden_columns(client, project_id)  # exactly the Data Manager's own default
    client.request("POST", "/api/dm/views/", f"create the Default tab of project {project_id}",
                   json={"project": int(project_id), "data": data})


def upsert_task_tab(client: LabelStudioClient, project_id: int, title: str, task_ids: Iterable[int],
                    ordering: Sequence[str] = (), shown: Sequence[str] = ()) -> int:
    """Create or update the tab ``title`` so that it shows exactly ``task_ids`` (none: it matches no task).

    Args:
        client: the project's Label Studio.
        project_id: the project.
        title: the tab's title (tabs are found by title).
        task_ids: the tasks to show.
        ordering: Data Manager ordering, e.g. ``["tasks:predictions_score"]`` (least confident first).
        shown: columns to show although Label Studio hides them by default.

    Returns:
        The tab's id.
    """
    ids = sorted({int(t) for t in task_ids}) or [0]
    filters = {"conjunction": "or", "items": [
        {"filter": _TASK_ID_FILTER, "operator": "equal", "type": "Number", "value": i} for i in ids]}
    existing = [t for t in list_tabs(client, project_id) if (t.get("data") or {}).get("title") == title]
    if not existing:
        ensure_default_tab(client, project_id)
    body = {"project": int(project_id), "data": tab_data(client, project_id, title, filters, ordering, shown)}
    if existing:
        tab_id = int(existing[0]["id"])
        client.request("PATCH", f"/api/dm/views/{tab_id}/", f"update Data Manager tab {title!r}", json=body)
        return tab_id
    return int(client.request("POST", "/api/dm/views/", f"create Data Manager tab {title!r}", json=body).json()["id"])


def tab_task_ids(client: LabelStudioClient, project_id: int, tab_id: int) -> list[int]:
    """Ids of the tasks a Data Manager tab shows (its filters and ordering applied by Label Studio)."""
    answer = client.request("GET", "/api/tasks", f"list the tasks of tab {tab_id}",
                            params={"project": int(project_id), "view": int(tab_id), "page_size": 1000,
                                    "fields": "task_only"}).json()
    return [int(t["id"]) for t in answer.get("tasks", [])]
