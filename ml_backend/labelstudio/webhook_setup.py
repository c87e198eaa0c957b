"""The backend's own, authenticated project webhook in Label Studio.

Label Studio creates a webhook to ``<ML backend URL>/webhook`` when a model is connected, without any header: it
cannot pass HTTP Basic auth. With Basic auth on, ``/webhook`` requires it (``WEBHOOK_REQUIRE_AUTH`` defaults on),
so after a verified ``/setup`` the backend replaces that webhook by one with the same URL that sends the
``Authorization`` header (``POST /api/webhooks/``), and deletes header-less ones to the same URL. Label Studio
re-creates its own webhook only when a new ML backend record is created and no webhook to that URL exists, so
the replacement stays. The ML backends of the project that use this backend's Basic-auth user are the ones
whose webhooks are replaced; others are left alone.

Runs in a background thread (never inside Label Studio's 3 s ``/setup``), once per project and connection.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ml_backend.labelstudio.connections import LSConnection
from ml_backend.labelstudio.errors import LabelStudioError
from ml_backend.settings import Settings

__all__ = ["WebhookRegistrar", "ensure_authenticated_webhook"]

log = logging.getLogger(__name__)


def ensure_authenticated_webhook(settings: Settings, conn: LSConnection, project_id: int) -> list[str]:
    """Make every webhook of ``project_id`` to this backend send Basic auth; returns the webhook URLs that are right (one
    webhook with the header, none without) and needed no change in this call. Empty while Label Studio shows no ML
    backend of this project that uses this backend's Basic-auth user (e.g. during the model's first connection, whose
    /setup comes before the record is saved).

    Raises:
        LabelStudioError: Label Studio could not be read or changed (the token may lack the permission).
    """
    user, password = settings.basic_auth_user or "", settings.basic_auth_pass or ""
    header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    client = conn.client(timeout=10.0)
    backends = client.request("GET", "/api/ml", f"list the ML backends of project {project_id}",
                              params={"project": int(project_id)}).json()
    ours = [b for b in backends if isinstance(b, dict) and b.get("auth_method") == "BASIC_AUTH"
            and b.get("basic_auth_user") == user and isinstance(b.get("url"), str)]
    hooks = client.request("GET", "/api/webhooks/", f"list the webhooks of project {project_id}",
                           params={"project": int(project_id)}).json()
    handled = []
    for backend in ours:
        target = str(backend["url"]).rstrip("/") + "/webhook"
        same = [h for h in hooks if isinstance(h, dict) and str(h.get("url", "")).rstrip("/") == target]
        good = [h for h in same if (h.get("headers") or {}).get("Authorization") == header]
        if good and len(same) == 1:
            handled.append(target)  # already right: Label Studio will not add its own (the URL exists)
            continue
        if not good:
            client.request("POST", "/api/webhooks/", f"create the authenticated webhook of project {project_id}",
                           json={"project": int(project_id), "url": target, "headers": {"Authorization": header},
                                 "send_payload": True, "send_for_all_actions": True, "is_active": True})
        for hook in same:  # header-less (Label Studio's own) or a duplicate: events would arrive twice
            if hook not in good[:1]:
                client.request("DELETE", f"/api/webhooks/{int(hook['id'])}/", f"remove webhook {hook['id']}")
        log.info("project %s: webhook %s now sends Basic auth", project_id, target)
    return handled


RETRY_AFTER_S = 20.0
"""A project whose webhooks are not right yet is checked again on a /setup at least this much later."""

FOLLOW_UP_S = (2.0, 5.0, 10.0, 30.0, 60.0)
"""Delays of the checks that follow a check which did not find the webhooks right, without waiting for a /setup.
The model's first connection calls /setup before Label Studio saves the ML backend record, and Label Studio may
call /setup again only when someone asks for predictions: meanwhile its header-less webhook is refused and the
annotations people submit would start no training."""


class WebhookRegistrar:
    """Runs :func:`ensure_authenticated_webhook` in the background after /setup calls, until a check finds the
    project's webhooks right (then not again for that connection); at most one check per :data:`RETRY_AFTER_S` from
    /setup calls, and follow-up checks :data:`FOLLOW_UP_S` after one that did not find them right (one chain of
    follow-ups per project and connection: a /setup while a follow-up waits leaves the check to it).

    Args:
        settings: the process settings (Basic auth user and password).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._done: set[tuple[int, str]] = set()
        self._tried: dict[tuple[int, str], float] = {}
        self._waiting: set[tuple[int, str]] = set()  # a follow-up check is scheduled
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-setup")

    def ensure(self, project_id: int, conn: LSConnection) -> None:
        """Schedule the check for ``project_id`` unless it was done for this connection already."""
        key = (int(project_id), conn.url)
        now = time.monotonic()
        with self._lock:
            if key in self._done or key in self._waiting or now - self._tried.get(key, -1e9) < RETRY_AFTER_S:
                return
            self._tried[key] = now
        self._pool.submit(self._run, int(project_id), conn, key, 0)

    def _run(self, project_id: int, conn: LSConnection, key: tuple[int, str], attempt: int) -> None:
        try:
            right = ensure_authenticated_webhook(self.settings, conn, project_id)
        except LabelStudioError as exc:  # end of a background task: logged, tried again below and on a later /setup
            log.warning("project %s: cannot set up the authenticated webhook: %s", project_id, exc)
            right = []
        with self._lock:
            if right:
                self._done.add(key)
                return
            if attempt >= len(FOLLOW_UP_S) or key in self._done or key in self._waiting:
                return
            self._waiting.add(key)
        timer = threading.Timer(FOLLOW_UP_S[attempt], self._follow_up, (project_id, conn, key, attempt + 1))
        timer.daemon = True
        timer.start()

    def _follow_up(self, project_id: int, conn: LSConnection, key: tuple[int, str], attempt: int) -> None:
        with self._lock:
            self._waiting.discard(key)
            if key in self._done:
                return
            self._tried[key] = time.monotonic()
        self._pool.submit(self._run, project_id, conn, key, attempt)
