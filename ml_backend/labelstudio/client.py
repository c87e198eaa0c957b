"""Access to a Label Studio server: projects and every task with every annotation.

Every request goes through the outbound gate (``ml_backend.net.gate``): to Label Studio's origin only, with the
credentials attached by the gate for that origin alone (``ml_backend.labelstudio.auth``: a legacy token, or a
personal access token exchanged for renewed 5-minute access tokens). ``label-studio-sdk`` reads projects through the
same gate (its httpx client gets a gate transport). Task lists are read with ``GET /api/projects/<id>/tasks/``,
which never makes Label Studio call ``/predict`` (the Data Manager list ``/api/tasks`` does when "retrieve
predictions automatically" is on). Data Manager tabs and comments: ``ml_backend.labelstudio.tabs``; what a
project and a task are: ``ml_backend.labelstudio.tasks``; the SDK's gate transport: ``ml_backend.labelstudio.sdk``.

Every failure is a :class:`LabelStudioError` that names the URL (without query), the HTTP status and what to
change — never the body Label Studio (or something pretending to be it) answered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from email.message import Message
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urljoin

import httpx

from ml_backend.labelstudio.auth import LabelStudioAuth, access_expiry
from ml_backend.labelstudio.errors import (
    LabelStudioAuthError,
    LabelStudioError,
    LabelStudioNotFound,
    LabelStudioUnreachable,
)
from ml_backend.labelstudio.sdk import GateTransport
from ml_backend.labelstudio.tasks import ProjectInfo, TaskRecord, parse_time, task_record
from ml_backend.net.gate import Destination, GateRefused, GateResponse, GateUnreachable, Origin, OutboundGate, safe_url
from model.errors import ConfigError

__all__ = ["LabelStudioClient", "TASK_PAGE_SIZE", "default_gate"]

log = logging.getLogger(__name__)

TASK_PAGE_SIZE = 500
"""Tasks per request when listing a project."""
RETRIES = 3
"""A GET that Label Studio answers 502/503/504 (restarting, overloaded) is tried this many more times."""

_gate_lock = threading.Lock()
_gate: OutboundGate | None = None


def default_gate() -> OutboundGate:
    """The process's outbound gate (one connection pool per checked address, shared by all clients)."""
    global _gate
    with _gate_lock:
        if _gate is None:
            _gate = OutboundGate()
        return _gate


class LabelStudioClient:
    """A Label Studio server reached with one API key; thread-safe.

    Args:
        url: base URL of Label Studio, e.g. ``http://localhost:8080`` (a trailing slash is ignored).
        api_key: legacy token or personal access token (JWT refresh token).
        trusted: the operator configured this URL (``LABEL_STUDIO_URL``) or it was verified and pinned: it may be
            on a private network. An untrusted URL must resolve to public addresses.
        timeout: seconds to connect and to read each answer.
        gate: the outbound gate (default: the process's).

    Raises:
        ConfigError: a URL that is not a plain http(s) origin, an empty key, or an unusable JWT.
    """

    def __init__(self, url: str, api_key: str, trusted: bool = True, timeout: float = 30.0,
                 gate: OutboundGate | None = None) -> None:
        try:
            self.origin = Origin.of(str(url))
        except GateRefused as exc:
            raise ConfigError(f"The Label Studio URL is unusable: {exc} Set LABEL_STUDIO_URL, e.g. http://localhost:8080.") \
                from None
        self.url = str(url).strip().rstrip("/")
        self.timeout = float(timeout)
        self.gate = gate or default_gate()
        self.auth = LabelStudioAuth(api_key, self._refresh)
        self.token_kind = self.auth.kind
        self.destination = Destination(origins=frozenset({self.origin}),
                                       private_ok=frozenset({self.origin}) if trusted else frozenset(),
                                       credentials_for=self.origin, auth=self.auth,
                                       private_remedy="set LABEL_STUDIO_URL to Label Studio's base URL (or "
                                                      "ALLOW_PRIVATE_SETUP_HOSTS=true)")
        self._sdk: Any = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LabelStudioClient(url={self.url!r}, token_kind={self.token_kind.value})"

    def close(self) -> None:
        """Nothing to release: connections are pooled by the gate."""

    # ---- authentication ------------------------------------------------------------------------------
    def _refresh(self, refresh_token: str) -> tuple[str, float]:
        """Exchange the personal access token for an access token (no credentials sent: the token is the body)."""
        url = f"{self.url}/api/token/refresh/"
        plain = Destination(origins=self.destination.origins, private_ok=self.destination.private_ok)
        try:
            answer = self.gate.request("POST", url, plain, json_body={"refresh": refresh_token}, timeout=self.timeout)
        except (GateRefused, GateUnreachable) as exc:
            raise LabelStudioUnreachable(f"{exc} (exchanging the personal access token)", safe_url(url), None) from None
        if answer.status in (400, 401, 403):
            raise LabelStudioAuthError(
                f"Label Studio at {safe_url(url)} refused the personal access token (HTTP {answer.status}); create a new "
                "one under Account & Settings and set LABEL_STUDIO_API_KEY.", safe_url(url), answer.status)
        self._raise_for_status(answer, "exchange the personal access token")
        access = answer.json().get("access") if isinstance(answer.json(), dict) else None
        if not isinstance(access, str):
            raise LabelStudioError(f"Label Studio at {safe_url(url)} answered the token refresh without an access token.",
                                   safe_url(url), answer.status)
        return access, access_expiry(access)

    # ---- plain REST ----------------------------------------------------------------------------------
    def request(self, method: str, path: str, what: str, *, params: Mapping[str, Any] | None = None,
                json: Any = None, max_bytes: int = 500_000_000) -> GateResponse:
        """Call ``<url><path>`` authenticated (a 401 with a personal access token renews it once: the gate does
        it); a GET that answers 502/503/504 is retried.

        Args:
            method: HTTP method.
            path: path below the base URL, starting with ``/``.
            what: what the call is for, for error messages ("list the tasks of project 3").
            params: query parameters.
            json: a body sent as JSON.
            max_bytes: the answer's size limit.

        Raises:
            LabelStudioError: (or a subclass) for no answer or a status >= 400.
        """
        url = f"{self.url}{path}"
        for attempt in range(RETRIES + 1):
            try:
                answer = self.gate.request(method, url, self.destination, params=params, json_body=json,
                                           timeout=self.timeout, max_bytes=max_bytes, deadline_s=self.timeout * 10)
            except (GateRefused, GateUnreachable) as exc:
                raise LabelStudioUnreachable(
                    f"{exc} Check that Label Studio runs and that LABEL_STUDIO_URL is reachable from this machine.",
                    safe_url(url), None) from None
            if method.upper() == "GET" and answer.status in (502, 503, 504) and attempt < RETRIES:
                time.sleep(0.5 * 2**attempt)
                continue
            self._raise_for_status(answer, what)
            return answer
        raise AssertionError("unreachable")

    def _raise_for_status(self, answer: GateResponse, what: str) -> None:
        """Raise the :class:`LabelStudioError` subclass of an HTTP error status, with the fix (never the body)."""
        status, url = answer.status, safe_url(answer.url)
        if status < 400:
            return
        log.debug("Label Studio answered %s to %s: %.300r", status, url, answer.body)
        if status == 401:
            raise LabelStudioAuthError(
                f"Label Studio at {url} refused the API key to {what} (HTTP 401); set LABEL_STUDIO_API_KEY to a valid "
                "token (Account & Settings); a legacy token also needs LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on the "
                "Label Studio server.", url, status)
        if status == 403:
            raise LabelStudioAuthError(
                f"Label Studio at {url} forbids the API key's user to {what} (HTTP 403); use the token of a user who "
                "owns or manages the project in LABEL_STUDIO_API_KEY.", url, status)
        if status == 404:
            raise LabelStudioNotFound(f"Label Studio at {url} has no such resource; cannot {what} (HTTP 404).", url, status)
        raise LabelStudioError(f"Label Studio at {url} failed to {what} (HTTP {status}).", url, status)

    # ---- projects and tasks --------------------------------------------------------------------------
    @property
    def sdk(self) -> Any:
        """The ``label_studio_sdk.LabelStudio`` client for the same server, its requests sent through the gate."""
        with self._lock:
            if self._sdk is None:
                from label_studio_sdk import LabelStudio  # heavy (over a second of imports): loaded on first use

                self._sdk = LabelStudio(base_url=self.url, api_key="attached-by-the-gate", timeout=self.timeout,
                                        httpx_client=httpx.Client(transport=GateTransport(self), timeout=self.timeout))
            return self._sdk

    def get_project(self, project_id: int) -> ProjectInfo:
        """The project's id, title, label config and number of tasks.

        Raises:
            LabelStudioNotFound: no such project (or not visible to this key's user).
        """
        from label_studio_sdk.core.api_error import ApiError  # with the SDK (see :attr:`sdk`)

        url = f"{self.url}/api/projects/{int(project_id)}/"
        try:
            project = self.sdk.projects.get(int(project_id))
        except ApiError as exc:
            self._raise_for_status(GateResponse(int(exc.status_code or 500), _no_headers(), url, b""),
                                   f"read project {project_id}")
            raise
        except httpx.HTTPError as exc:
            raise LabelStudioUnreachable(f"Label Studio at {safe_url(url)} did not answer ({type(exc).__name__}).",
                                         safe_url(url), None) from None
        except (GateRefused, GateUnreachable) as exc:
            raise LabelStudioUnreachable(str(exc), safe_url(url), None) from None
        except (ValueError, RecursionError):  # the SDK parsing an answer that is not JSON, or nested too deeply
            raise LabelStudioError(f"Label Studio at {safe_url(url)} answered with a body that is not a project (not "
                                   "JSON, or nested too deeply); is this Label Studio's URL?", safe_url(url), 200) \
                from None
        number = getattr(project, "task_number", None)
        return ProjectInfo(id=int(project.id), title=str(project.title or ""),
                           label_config=str(project.label_config or ""),
                           task_number=int(number) if number is not None else None)

    def iter_tasks(self, project_id: int, page_size: int = TASK_PAGE_SIZE,
                   updated_after: str | None = None) -> Iterator[TaskRecord]:
        """The project's tasks, newest change first, with all annotations of all annotators and predictions.

        Reads ``GET /api/projects/<id>/tasks/`` page by page (ordered by ``-updated_at``; this path never makes
        Label Studio call the ML backend). Cancelled (skipped) annotations are included, with ``was_cancelled``.

        Args:
            project_id: the project.
            page_size: tasks per request.
            updated_after: stop at the first task whose ``updated_at`` is not later than this ISO time (Label
                Studio moves a task's ``updated_at`` when one of its annotations is created, updated or deleted).

        Raises:
            LabelStudioError: a page could not be read.
        """
        since = parse_time(updated_after) if updated_after else None
        page = 1
        while True:
            try:
                tasks = self.request("GET", f"/api/projects/{int(project_id)}/tasks/",
                                     f"list the tasks of project {project_id}",
                                     params={"page": page, "page_size": int(page_size)}).json()
            except LabelStudioNotFound:
                if page == 1:
                    raise
                return  # past the last page
            if isinstance(tasks, Mapping):
                tasks = tasks.get("tasks") or tasks.get("results") or []
            for task in tasks:
                record = task_record(task)
                if since is not None and record.updated_at and parse_time(record.updated_at) <= since:
                    return
                yield record
            if len(tasks) < page_size:
                return
            page += 1

    def count_tasks(self, project_id: int) -> tuple[int, datetime | None]:
        """The number of tasks of the project, and Label Studio's clock when it answered (its HTTP ``Date``
        header, to the second; None without one): one small request."""
        response = self.request("GET", f"/api/projects/{int(project_id)}/", f"read project {project_id}")
        answer = response.json()
        if not isinstance(answer, Mapping) or answer.get("task_number") is None:
            raise LabelStudioError(f"Label Studio's project {project_id} carries no task_number; is this Label Studio 1.x?")
        try:
            server_time = parsedate_to_datetime(str(response.headers["Date"]))
        except (KeyError, TypeError, ValueError):
            server_time = None
        return int(answer["task_number"]), server_time

    def get_task(self, task_id: int) -> TaskRecord:
        """One task with its annotations and predictions."""
        return task_record(self.request("GET", f"/api/tasks/{int(task_id)}", f"read task {task_id}").json())

    def absolute_url(self, value: str) -> str:
        """A task data value as a full URL: ``/data/upload/1/x.png`` -> ``<url>/data/upload/1/x.png``.

        Absolute ``http(s)://`` URLs and other schemes (``s3://`` ...) come back unchanged.
        """
        text = str(value).strip()
        if "://" in text:
            return text
        return urljoin(self.url + "/", text.lstrip("/"))

    def is_own_url(self, url: str) -> bool:
        """Whether ``url`` has this Label Studio's exact origin (so the gate sends its credentials there)."""
        try:
            return Origin.of(url) == self.origin
        except GateRefused:
            return False


def _no_headers() -> Message:
    return Message()
