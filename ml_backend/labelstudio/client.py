"""Access to a Label Studio server: projects, every task with every annotation, and flags on tasks.

Built on ``label-studio-sdk`` (projects) and plain ``requests`` where the SDK's typed models would reshape
what Label Studio returns (task lists, whose annotation dicts are handed on unchanged) or where the SDK has
no call (Data Manager tabs). Two kinds of API key work:

* a legacy token (``Authorization: Token <key>``), which needs ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true``
  on servers from 1.18 on;
* a personal access token, a JWT *refresh* token, exchanged at ``POST /api/token/refresh/`` for a
  5-minute access token (``Authorization: Bearer <access>``) that is cached and renewed a minute early.

Flags for annotator disagreements: Label Studio Community has no comment API (``/api/comments/`` answers
404; comments are an Enterprise feature), so :meth:`LabelStudioClient.post_comment` raises
:class:`NotSupportedByServer` there. What Community offers is a Data Manager tab whose filter lists the
flagged tasks: :meth:`LabelStudioClient.upsert_task_tab`.

Every failure is a :class:`LabelStudioError` that names the URL, the HTTP status and what to change.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from ml_backend.labelstudio.auth import ACCESS_TOKEN_MARGIN_S, TokenKind, _jwt_claims, token_kind
from ml_backend.labelstudio.errors import (
    LabelStudioAuthError,
    LabelStudioError,
    LabelStudioNotFound,
    LabelStudioUnreachable,
    NotSupportedByServer,
)
from model.errors import ConfigError

__all__ = ["LabelStudioClient", "ProjectInfo", "TASK_PAGE_SIZE", "TaskRecord", "preload_sdk"]

#: Tasks per page when listing a project.
TASK_PAGE_SIZE = 100
#: The ``filter`` value of a Data Manager tab filter on the task id.
_TASK_ID_FILTER = "filter:tasks:id"


@dataclass(frozen=True)
class ProjectInfo:
    """A Label Studio project as the backend needs it."""

    id: int
    title: str
    label_config: str


@dataclass(frozen=True)
class TaskRecord:
    """One task with every annotation of every annotator, as Label Studio returns them.

    Attributes:
        id: task id.
        data: the task data (``{"image": "/data/upload/3/x.png", ...}``).
        annotations: annotation dicts unchanged: ``id``, ``completed_by`` (user id), ``result``,
            ``was_cancelled``, ``ground_truth``, ``created_at``, ``updated_at``, ``lead_time``, ...
        predictions: prediction dicts (``model_version``, ``score``, ``result``, ...).
    """

    id: int
    data: dict
    annotations: list[dict] = field(default_factory=list)
    predictions: list[dict] = field(default_factory=list)
    updated_at: str = ""  # Label Studio's ISO time of the task's last change (an annotation's too)


class LabelStudioClient:
    """A Label Studio server reached with one API key; thread-safe.

    Args:
        url: base URL of Label Studio, e.g. ``http://localhost:8080`` (a trailing slash is ignored).
        api_key: legacy token or personal access token (JWT refresh token).
        timeout: seconds to connect and to read each answer.

    Raises:
        ConfigError: an empty URL or key, or an unusable JWT.
    """

    def __init__(self, url: str, api_key: str, timeout: float = 30.0) -> None:
        if not url or not str(url).startswith(("http://", "https://")):
            raise ConfigError(f"Label Studio URL {url!r} is not an http(s) URL; set LABEL_STUDIO_URL, e.g. http://localhost:8080.")
        if not api_key or not str(api_key).strip():
            raise ConfigError("No Label Studio API key; set LABEL_STUDIO_API_KEY (legacy token or personal access token).")
        self.url = str(url).rstrip("/")
        self.timeout = float(timeout)
        self._api_key = str(api_key).strip()
        self.token_kind = token_kind(self._api_key)
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_expires = 0.0
        self._sdk = None
        self._comments_supported: bool | None = None
        self._session = requests.Session()
        retry = Retry(total=3, connect=3, read=2, status=3, backoff_factor=0.5,
                      status_forcelist=(502, 503, 504), allowed_methods=frozenset({"GET"}))
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r}, token_kind={self.token_kind.value})"

    def close(self) -> None:
        """Close the HTTP connections."""
        self._session.close()

    # ---- authentication ------------------------------------------------------------------------------
    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate to this Label Studio (also for ``/data/upload/...`` image downloads).

        Raises:
            LabelStudioAuthError: the personal access token was refused by ``/api/token/refresh/``.
        """
        if self.token_kind is TokenKind.LEGACY:
            return {"Authorization": f"Token {self._api_key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def _access_token(self, force: bool = False) -> str:
        with self._lock:
            if force or self._access is None or time.time() >= self._access_expires - ACCESS_TOKEN_MARGIN_S:
                self._access, self._access_expires = self._refresh()
            return self._access

    def _refresh(self) -> tuple[str, float]:
        url = f"{self.url}/api/token/refresh/"
        try:
            answer = self._session.post(url, json={"refresh": self._api_key}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise self._unreachable(url, exc) from None
        if answer.status_code in (400, 401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {url} refused the personal access token (HTTP {answer.status_code}: "
                f"{_detail(answer)}); create a new one under Account & Settings and set LABEL_STUDIO_API_KEY.",
                url, answer.status_code,
            )
        self._raise_for_status(answer, "exchange the personal access token")
        access = answer.json().get("access")
        assert isinstance(access, str), "token refresh answered without an access token"
        claims = _jwt_claims(access) or {}
        return access, float(claims.get("exp", time.time() + 300))

    # ---- plain REST ----------------------------------------------------------------------------------
    def request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """Call ``<url><path>`` authenticated; a 401 with a personal access token renews it once.

        Args:
            method: HTTP method.
            path: path below the base URL, starting with ``/``.
            what: what the call is for, for error messages ("list the tasks of project 3").
            **kwargs: passed to ``requests`` (``params``, ``json``, ...).

        Raises:
            LabelStudioError: (or a subclass) for no answer or a status >= 400.
        """
        url = f"{self.url}{path}"
        extra_headers = kwargs.pop("headers", {})
        for attempt in range(2):
            headers = {**self.auth_headers(), **extra_headers}
            try:
                answer = self._session.request(method, url, headers=headers, timeout=self.timeout, **kwargs)
            except requests.RequestException as exc:
                raise self._unreachable(url, exc) from None
            if answer.status_code == 401 and self.token_kind is TokenKind.PERSONAL_ACCESS and attempt == 0:
                self._access_token(force=True)
                continue
            self._raise_for_status(answer, what)
            return answer
        raise AssertionError("unreachable")

    def _unreachable(self, url: str, exc: Exception) -> LabelStudioUnreachable:
        return LabelStudioUnreachable(
            f"Label Studio at {url} did not answer ({type(exc).__name__}: {exc}); check that it runs and that "
            "LABEL_STUDIO_URL (or the LABEL_STUDIO_HOST Label Studio sends in /setup) is reachable from this machine.",
            url, None,
        )

    def _raise_for_status(self, answer: requests.Response, what: str) -> None:
        if answer.status_code >= 400:
            self._raise_status(answer.status_code, answer.url, _detail(answer), what)

    def _raise_status(self, status: int, url: str, detail: str, what: str) -> None:
        """Raise the :class:`LabelStudioError` subclass of an HTTP error ``status``, with the fix."""
        if status == 401:
            hint = ("set LABEL_STUDIO_API_KEY to a valid token (Account & Settings); a legacy token also needs "
                    "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on the Label Studio server")
            raise LabelStudioAuthError(f"Label Studio at {url} refused the API key to {what} (HTTP 401: {detail}); {hint}.", url, status)
        if status == 403:
            raise LabelStudioAuthError(
                f"Label Studio at {url} forbids the API key's user to {what} (HTTP 403: {detail}); use the token of "
                "a user who owns or manages the project in LABEL_STUDIO_API_KEY.", url, status)
        if status == 404:
            raise LabelStudioNotFound(f"Label Studio at {url} has no such resource; cannot {what} (HTTP 404: {detail}).", url, status)
        raise LabelStudioError(f"Label Studio at {url} failed to {what} (HTTP {status}: {detail}).", url, status)

    # ---- projects and tasks --------------------------------------------------------------------------
    @property
    def sdk(self):
        """The ``label_studio_sdk.LabelStudio`` client for the same server and key (built on first use)."""
        with self._lock:
            if self._sdk is None:
                from label_studio_sdk import LabelStudio

                self._sdk = LabelStudio(base_url=self.url, api_key=self._api_key, timeout=self.timeout)
            return self._sdk

    def get_project(self, project_id: int) -> ProjectInfo:
        """The project's id, title and label config.

        Raises:
            LabelStudioNotFound: no such project (or not visible to this key's user).
        """
        import httpx
        from label_studio_sdk.core.api_error import ApiError

        url = f"{self.url}/api/projects/{int(project_id)}/"
        try:
            project = self.sdk.projects.get(int(project_id))
        except ApiError as exc:
            body = exc.body
            detail = str(body.get("detail") or body) if isinstance(body, Mapping) else str(body or "")
            self._raise_status(int(exc.status_code or 500), url, detail[:300], f"read project {project_id}")
            raise
        except httpx.HTTPError as exc:
            raise self._unreachable(url, exc) from None
        return ProjectInfo(id=int(project.id), title=str(project.title or ""), label_config=str(project.label_config or ""))

    def iter_tasks(self, project_id: int, page_size: int = TASK_PAGE_SIZE,
                   updated_after: str | None = None) -> Iterator[TaskRecord]:
        """Every task of the project in id order, with all annotations of all annotators and predictions.

        Uses ``GET /api/tasks?project=ID&fields=all`` page by page (without ``fields=all`` Label Studio
        leaves the annotations out). Cancelled (skipped) annotations are included, with ``was_cancelled``.

        Args:
            project_id: the project.
            page_size: tasks per request.
            updated_after: only tasks whose ``updated_at`` is later than this ISO time (a Data Manager filter;
                Label Studio updates a task's ``updated_at`` when one of its annotations is created, updated
                or deleted).

        Raises:
            LabelStudioError: a page could not be read.
        """
        page, seen = 1, 0
        extra: dict[str, Any] = {}
        if updated_after:
            extra["query"] = json.dumps({"filters": {"conjunction": "and", "items": [{
                "filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime",
                "value": updated_after}]}})
        while True:
            answer = self.request("GET", "/api/tasks", f"list the tasks of project {project_id}", params={
                "project": int(project_id), "fields": "all", "page": page, "page_size": int(page_size),
                "ordering": "id", **extra,
            }).json()
            tasks = answer.get("tasks", []) if isinstance(answer, Mapping) else answer
            for task in tasks:
                yield _task_record(task)
            seen += len(tasks)
            total = answer.get("total") if isinstance(answer, Mapping) else None
            if not tasks or len(tasks) < page_size or (total is not None and seen >= int(total)):
                return
            page += 1

    def count_tasks(self, project_id: int) -> tuple[int, datetime | None]:
        """The number of tasks of the project, and Label Studio's clock when it answered (its HTTP ``Date``
        header, to the second; None without one): one small request."""
        response = self.request("GET", "/api/tasks", f"count the tasks of project {project_id}", params={
            "project": int(project_id), "fields": "task_only", "page": 1, "page_size": 1})
        answer = response.json()
        if not isinstance(answer, Mapping) or "total" not in answer:
            raise LabelStudioError(f"Label Studio's task list of project {project_id} carries no total; "
                                   "is this Label Studio 1.x?")
        try:
            server_time = parsedate_to_datetime(response.headers["Date"])
        except (KeyError, TypeError, ValueError):
            server_time = None
        return int(answer["total"]), server_time

    def get_task(self, task_id: int) -> TaskRecord:
        """One task with its annotations and predictions."""
        return _task_record(self.request("GET", f"/api/tasks/{int(task_id)}", f"read task {task_id}").json())

    def absolute_url(self, value: str) -> str:
        """A task data value as a full URL: ``/data/upload/1/x.png`` -> ``<url>/data/upload/1/x.png``.

        Absolute ``http(s)://`` URLs and other schemes (``s3://`` ...) come back unchanged.
        """
        text = str(value).strip()
        if "://" in text:
            return text
        return urljoin(self.url + "/", text.lstrip("/"))

    def is_own_url(self, url: str) -> bool:
        """Whether ``url`` points at this Label Studio server (so its auth headers may be sent there)."""
        a, b = urlsplit(self.url), urlsplit(url)
        return (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port)

    # ---- flags: comments (Enterprise) and Data Manager tabs (all editions) ---------------------------
    def supports_comments(self) -> bool:
        """Whether this server has the comment API (Label Studio Enterprise); probed once."""
        if self._comments_supported is None:
            try:
                self.request("GET", "/api/comments/", "probe the comment API", params={"task": 0})
                self._comments_supported = True
            except LabelStudioNotFound:
                self._comments_supported = False
            except LabelStudioError as exc:
                self._comments_supported = exc.status is not None and exc.status < 500 and exc.status != 405
        return self._comments_supported

    def post_comment(self, project_id: int, task_id: int, text: str) -> int:
        """Add a comment to a task; returns the comment id.

        Raises:
            NotSupportedByServer: the server has no comment API (Label Studio Community); flag the tasks
                with :meth:`upsert_task_tab` instead.
        """
        self._require_comments()
        body = {"project": int(project_id), "task": int(task_id), "text": str(text), "is_resolved": False}
        return int(self.request("POST", "/api/comments/", f"comment on task {task_id}", json=body).json()["id"])

    def list_comments(self, task_id: int) -> list[dict]:
        """The comments of a task (``id``, ``text``, ``is_resolved``, ``created_by`` ...).

        Raises:
            NotSupportedByServer: no comment API on this server.
        """
        self._require_comments()
        answer = self.request("GET", "/api/comments/", f"list the comments of task {task_id}", params={"task": int(task_id)}).json()
        return list(answer.get("results", answer) if isinstance(answer, Mapping) else answer)

    def resolve_comment(self, comment_id: int, resolved: bool = True) -> None:
        """Mark a comment resolved (or unresolved again).

        Raises:
            NotSupportedByServer: no comment API on this server.
        """
        self._require_comments()
        self.request("PATCH", f"/api/comments/{int(comment_id)}/", f"resolve comment {comment_id}", json={"is_resolved": bool(resolved)})

    def _require_comments(self) -> None:
        if not self.supports_comments():
            raise NotSupportedByServer(
                f"Label Studio at {self.url} has no comment API (/api/comments/ answers 404: comments are a Label "
                "Studio Enterprise feature); flags are shown as a Data Manager tab instead.", f"{self.url}/api/comments/", 404)

    def list_tabs(self, project_id: int) -> list[dict]:
        """The project's Data Manager tabs (``id``, ``data.title``, ``data.filters`` ...)."""
        return list(self.request("GET", "/api/dm/views/", f"list the Data Manager tabs of project {project_id}",
                                 params={"project": int(project_id)}).json())

    def upsert_task_tab(self, project_id: int, title: str, task_ids: Iterable[int]) -> int:
        """Create or update the Data Manager tab ``title`` so that it shows exactly ``task_ids``.

        The tab's filter is "task id equals a OR b OR ..."; with no ids it matches no task (id = 0). Every
        user of the organisation sees the tab, in every edition. Returns the tab's id.
        """
        ids = sorted({int(t) for t in task_ids}) or [0]
        filters = {"conjunction": "or", "items": [
            {"filter": _TASK_ID_FILTER, "operator": "equal", "type": "Number", "value": i} for i in ids]}
        body = {"project": int(project_id), "data": {"title": str(title), "filters": filters}}
        existing = [t for t in self.list_tabs(project_id)
                    if int(t.get("project", project_id)) == int(project_id) and (t.get("data") or {}).get("title") == title]
        if existing:
            tab_id = int(existing[0]["id"])
            self.request("PATCH", f"/api/dm/views/{tab_id}/", f"update Data Manager tab {title!r}", json=body)
            return tab_id
        return int(self.request("POST", "/api/dm/views/", f"create Data Manager tab {title!r}", json=body).json()["id"])

    def tab_task_ids(self, project_id: int, tab_id: int) -> list[int]:
        """Ids of the tasks a Data Manager tab shows (its filters applied by Label Studio)."""
        answer = self.request("GET", "/api/tasks", f"list the tasks of tab {tab_id}",
                              params={"project": int(project_id), "view": int(tab_id), "page_size": 1000}).json()
        return [int(t["id"]) for t in answer.get("tasks", [])]


def preload_sdk() -> None:
    """Import the parts of label-studio-sdk the client uses (over a second of CPU on first use) without any
    request, for a process that waits for its job (``ml_backend.training.jobs.warm_up``)."""
    import httpx  # noqa: F401
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError  # noqa: F401

    LabelStudio(base_url="http://127.0.0.1:9", api_key="preload").projects  # the projects client loads lazily


def _task_record(task: Mapping[str, Any]) -> TaskRecord:
    return TaskRecord(
        id=int(task["id"]),
        data=dict(task.get("data") or {}),
        annotations=[dict(a) for a in task.get("annotations") or []],
        predictions=[dict(p) for p in task.get("predictions") or []],
        updated_at=str(task.get("updated_at") or ""),
    )


def _detail(answer: requests.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return answer.text[:300].strip() or answer.reason or ""
    if isinstance(body, Mapping):
        return str(body.get("detail") or body.get("validation_errors") or body)[:300]
    return str(body)[:300]
