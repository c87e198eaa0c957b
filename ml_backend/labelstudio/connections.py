"""Where each project's Label Studio is, how to authenticate to it, and who may change that: the trust model.

Label Studio sends ``hostname`` and ``access_token`` in every ``/setup`` call, without authentication. Anyone who
can reach the backend can send the same. So:

* ``LABEL_STUDIO_URL`` set (the recommended deployment): ``/setup``'s ``hostname`` is never used. The backend
  talks to ``LABEL_STUDIO_URL`` only, with ``LABEL_STUDIO_API_KEY``; without a key it takes ``/setup``'s token only
  when ``/setup``'s hostname has exactly ``LABEL_STUDIO_URL``'s origin. (A key without a URL is refused at start-up:
  the operator's key must never go to a host an unauthenticated caller names.)
* ``LABEL_STUDIO_URL`` unset: the first ``/setup`` of a project is verified against the Label Studio it names (the
  project exists there with that id and the same label config, read with that token) and then pinned: origin and
  token are kept in ``ProjectPaths.connection`` (mode 0600). A later ``/setup`` naming another origin is refused,
  unless the caller is authenticated (HTTP Basic auth); the token may change only for the pinned origin, and only
  after the new token is verified too. A hostname must be a plain origin, and it must resolve to public addresses
  unless ``ALLOW_PRIVATE_SETUP_HOSTS`` is set.

Either way a project is *known* (:func:`known`) once ``/setup`` was verified against Label Studio: only known
projects are trained. Verification answers are cached (``/setup`` comes before every prediction batch, within
Label Studio's 3 s timeout).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.errors import LabelStudioError, LabelStudioNotFound
from ml_backend.net.gate import GateRefused, Origin, safe_url
from ml_backend.settings import Settings
from model.atomic import atomic_write_json
from model.errors import ConfigError, DataError

__all__ = ["LSConnection", "SetupRequest", "accept_setup", "ensure_known", "forget_all", "known", "remembered", "resolve",
           "verify_project"]

log = logging.getLogger(__name__)

VERIFY_TIMEOUT_S = 1.5
"""Longest a /setup waits for Label Studio to confirm a project (Label Studio gives /setup 3 s)."""

_lock = threading.Lock()
_memory: dict[tuple[str, int], LSConnection] = {}


@dataclass(frozen=True)
class LSConnection:
    """A project's Label Studio: base URL (no trailing slash), API key, and whether it may be on a private network.

    Attributes:
        url: Label Studio's base URL.
        api_key: legacy token or personal access token (JWT refresh token); "" when only verified, not stored.
        trusted: the operator configured it (``LABEL_STUDIO_URL``) or allowed private /setup hosts.
    """

    url: str
    api_key: str
    trusted: bool = True

    def __repr__(self) -> str:  # never print the key
        return f"LSConnection(url={self.url!r}, api_key=***, trusted={self.trusted})"

    @property
    def origin(self) -> Origin:
        return Origin.of(self.url)

    def client(self, timeout: float = 30.0) -> LabelStudioClient:
        """A client for this Label Studio (through the gate)."""
        return LabelStudioClient(self.url, self.api_key, trusted=self.trusted, timeout=timeout)


@dataclass(frozen=True)
class SetupRequest:
    """What one ``/setup`` call says (already bounded by the HTTP layer).

    Attributes:
        project_id: the project.
        hostname: Label Studio's base URL as it sends it (its ``LABEL_STUDIO_HOST``), or None.
        access_token: the project creator's token, or None.
        schema: the project's label config, or None.
        authenticated: the caller passed HTTP Basic auth (only then may a pinned origin change).
    """

    project_id: int
    hostname: str | None
    access_token: str | None
    schema: str | None
    authenticated: bool


Verifier = Callable[[LSConnection, int, "str | None"], None]


def verify_project(conn: LSConnection, project_id: int, schema: str | None) -> None:
    """Check that ``conn`` is a Label Studio holding ``project_id`` (with label config ``schema`` when given).

    Raises:
        ConfigError: it is not (the message says what to do; it never quotes what the host answered).
    """
    client = conn.client(timeout=VERIFY_TIMEOUT_S)
    try:
        answer = client.request("GET", f"/api/projects/{int(project_id)}/", f"read project {project_id}",
                                max_bytes=20_000_000).json()
    except LabelStudioNotFound:
        raise ConfigError(f"Label Studio at {safe_url(conn.url)} has no project {project_id} visible to this token; "
                          "connect the model from that project.") from None
    except LabelStudioError as exc:
        raise ConfigError(f"Cannot verify project {project_id} at {safe_url(conn.url)}: {exc}") from None
    except DataError:  # not JSON, or nested too deeply
        answer = None
    if not isinstance(answer, dict) or answer.get("id") != int(project_id):
        raise ConfigError(f"{safe_url(conn.url)} did not answer like a Label Studio holding project {project_id}.")
    if schema is not None and str(answer.get("label_config") or "").strip() != schema.strip():
        raise ConfigError(f"The label config /setup sent is not project {project_id}'s label config at "
                          f"{safe_url(conn.url)}; refused.")


def _key(settings: Settings, project_id: int) -> tuple[str, int]:
    return (_real_dir(str(settings.model_dir)), int(project_id))


@functools.lru_cache(maxsize=64)
def _real_dir(model_dir: str) -> str:
    """``MODEL_DIR`` with links resolved, once per directory (every /predict looks its connection up)."""
    return os.path.realpath(model_dir)


def remembered(settings: Settings, project_id: int) -> LSConnection | None:
    """The verified connection of ``project_id`` (this process's memory, else its file), or None."""
    key = _key(settings, project_id)
    with _lock:
        if key in _memory:
            return _memory[key]
    path = settings.project(project_id).connection
    try:
        data = json.loads(path.read_text())
        if not data.get("verified_at"):
            return None  # written by an older version, before verification existed: verify again
        conn = LSConnection(url=str(data["url"]), api_key=str(data.get("api_key") or ""),
                            trusted=bool(data.get("trusted", False)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("project %s: unreadable %s (%s); ignoring it", project_id, path, exc)
        return None
    with _lock:
        _memory.setdefault(key, conn)
    return conn


def _store(settings: Settings, project_id: int, conn: LSConnection) -> None:
    atomic_write_json(settings.project(project_id).connection,
                      {"url": conn.url, "api_key": conn.api_key, "trusted": conn.trusted, "verified_at": time.time()},
                      mode=0o600)
    with _lock:
        _memory[_key(settings, project_id)] = conn


def known(settings: Settings, project_id: int) -> bool:
    """Whether ``project_id``'s connection was verified against Label Studio (only known projects are trained)."""
    return remembered(settings, project_id) is not None


_unknown: TTLCache[tuple[str, int], bool] = TTLCache(maxsize=4096, ttl=60.0)


def ensure_known(settings: Settings, project_id: int, verify: Verifier = verify_project) -> bool:
    """Whether ``project_id`` is known; with ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY`` set, an unknown
    project is verified against that Label Studio now (a miss is remembered for a minute, so invented ids cost
    Label Studio one request each at most per minute)."""
    if known(settings, project_id):
        return True
    if not (settings.label_studio_url and settings.label_studio_api_key):
        return False
    key = _key(settings, project_id)
    with _lock:
        if key in _unknown:
            return False
    url = settings.label_studio_url.rstrip("/")
    try:
        verify(LSConnection(url, settings.label_studio_api_key, trusted=True), project_id, None)
    except ConfigError as exc:
        log.info("project %s: not verified at %s: %s", project_id, url, exc)
        with _lock:
            _unknown[key] = True
        return False
    _store(settings, project_id, LSConnection(url, "", trusted=True))
    return True


def _setup_origin(hostname: str) -> str:
    """``hostname`` as a base URL: a plain http(s) origin with an optional path, nothing else.

    Raises:
        ConfigError: anything else.
    """
    text = str(hostname).strip().rstrip("/")
    try:
        Origin.of(text)
    except GateRefused as exc:
        raise ConfigError(f"/setup's hostname is unusable: {exc}") from None
    if "?" in text or "#" in text:
        raise ConfigError(f"/setup's hostname {safe_url(text)!r} holds a query or fragment; refused (it must be Label "
                          "Studio's base URL, its LABEL_STUDIO_HOST).")
    return text


def accept_setup(settings: Settings, setup: SetupRequest, verify: Verifier = verify_project) -> LSConnection | None:
    """Apply the trust model to one ``/setup``: verify and pin, keep, or refuse.

    Returns:
        the project's connection after this call (None when the backend cannot reach Label Studio for it).

    Raises:
        ConfigError: the call is refused (the message is shown by Label Studio; it names the remedy).
    """
    pid = setup.project_id
    current = remembered(settings, pid)
    if settings.label_studio_url:
        url = settings.label_studio_url.rstrip("/")
        token = settings.label_studio_api_key
        if not token:
            sent_origin = None
            if setup.hostname:
                try:
                    sent_origin = Origin.of(_setup_origin(setup.hostname))
                except ConfigError:
                    sent_origin = None
            if setup.access_token and sent_origin == Origin.of(url):
                token = str(setup.access_token).strip()
            elif current is not None and current.api_key:
                token = current.api_key
        if not token:
            raise ConfigError(f"No Label Studio token for project {pid}: set LABEL_STUDIO_API_KEY, or make Label Studio's "
                              f"LABEL_STUDIO_HOST equal LABEL_STUDIO_URL ({url}) so that /setup's token may be used.")
        conn = LSConnection(url, token if not settings.label_studio_api_key else "", trusted=True)
        if current is not None and current == conn:
            return conn
        verify(LSConnection(url, token, trusted=True), pid, setup.schema)
        _store(settings, pid, conn)
        log.info("project %s: verified at %s (LABEL_STUDIO_URL)", pid, url)
        return conn
    if not setup.hostname or not setup.access_token:
        if current is not None:
            return current
        raise ConfigError(f"Label Studio sent no hostname/token for project {pid}: set LABEL_STUDIO_URL and "
                          "LABEL_STUDIO_API_KEY on the backend (or LABEL_STUDIO_HOST on Label Studio).")
    conn = LSConnection(_setup_origin(setup.hostname), str(setup.access_token).strip(),
                        trusted=settings.allow_private_setup_hosts)
    if current is not None:
        if current.url == conn.url and current.api_key == conn.api_key:
            return current
        if current.origin != conn.origin and not setup.authenticated:
            raise ConfigError(
                f"Project {pid} is connected to the Label Studio at {current.url}; this /setup names {safe_url(conn.url)} "
                "and is not authenticated, so it is refused. Set LABEL_STUDIO_URL, or turn on BASIC_AUTH_USER/"
                "BASIC_AUTH_PASS (an authenticated /setup may move a project), or delete the project's connection.json."
            )
    verify(conn, pid, setup.schema)
    _store(settings, pid, conn)
    log.info("project %s: connection to %s verified and pinned", pid, conn.url)
    return conn


def resolve(settings: Settings, project_id: int) -> LSConnection:
    """How to reach Label Studio for ``project_id``.

    Raises:
        ConfigError: no verified connection, naming what to set.
    """
    stored = remembered(settings, project_id)
    if settings.label_studio_url:
        key = settings.label_studio_api_key or (stored.api_key if stored is not None else "")
        if stored is not None and stored.api_key and stored.origin != Origin.of(settings.label_studio_url):
            key = settings.label_studio_api_key or ""
        if key:
            return LSConnection(settings.label_studio_url.rstrip("/"), key, trusted=True)
    elif stored is not None and stored.api_key:
        return stored
    raise ConfigError(
        f"No verified Label Studio connection for project {project_id}: set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY "
        "for the backend (and its workers), or connect the model in Label Studio so that /setup sends its host and token."
    )


def forget_all() -> None:
    """Drop the in-memory connections (the files stay); used when settings change in one process."""
    with _lock:
        _memory.clear()
        _unknown.clear()
