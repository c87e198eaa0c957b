"""Where Label Studio is and how to authenticate to it, per project.

Label Studio sends ``hostname`` and ``access_token`` in every ``/setup`` call. :func:`remember` keeps them in
memory and in ``ProjectPaths.connection`` (mode 0600) so that training workers in other processes can
read them; :func:`resolve` prefers the operator's ``LABEL_STUDIO_URL`` / ``LABEL_STUDIO_API_KEY``.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from ml_backend.settings import Settings
from model.atomic import atomic_write_json
from model.errors import ConfigError

__all__ = ["LSConnection", "forget_all", "remember", "remembered", "resolve"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_memory: dict[tuple[str, int], LSConnection] = {}


@dataclass(frozen=True)
class LSConnection:
    """Base URL of Label Studio (no trailing slash) and its API key (legacy token or JWT refresh token)."""

    url: str
    api_key: str

    def __repr__(self) -> str:  # never print the key
        return f"LSConnection(url={self.url!r}, api_key=***)"


def _key(settings: Settings, project_id: int) -> tuple[str, int]:
    return (str(Path(settings.model_dir).resolve()), int(project_id))


def remember(settings: Settings, project_id: int, hostname: str | None, access_token: str | None) -> bool:
    """Keep what /setup sent for ``project_id``; writes the file only when something changed.

    Args:
        settings: the process settings (where the project directory lies).
        project_id: the Label Studio project.
        hostname: Label Studio's base URL as it sends it (``LABEL_STUDIO_HOST``); ignored when empty.
        access_token: the project creator's token; ignored when empty.

    Returns:
        True when the stored connection changed.
    """
    if not hostname or not access_token:
        return False
    conn = LSConnection(url=str(hostname).strip().rstrip("/"), api_key=str(access_token).strip())
    if not conn.url.startswith(("http://", "https://")):
        log.warning("project %s: /setup hostname %r is not an http(s) URL; not remembered", project_id, hostname)
        return False
    key = _key(settings, project_id)
    with _lock:
        if _memory.get(key) == conn:
            return False
        atomic_write_json(settings.project(project_id).connection, {"url": conn.url, "api_key": conn.api_key},
                          mode=0o600)
        _memory[key] = conn
    return True


def remembered(settings: Settings, project_id: int) -> LSConnection | None:
    """The connection last sent by /setup for ``project_id`` (this process's memory, else the file)."""
    key = _key(settings, project_id)
    with _lock:
        if key in _memory:
            return _memory[key]
    path = settings.project(project_id).connection
    try:
        data = json.loads(path.read_text())
        conn = LSConnection(url=str(data["url"]), api_key=str(data["api_key"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("project %s: unreadable %s (%s); ignoring it", project_id, path, exc)
        return None
    with _lock:
        _memory.setdefault(key, conn)
    return conn


def resolve(settings: Settings, project_id: int) -> LSConnection:
    """How to reach Label Studio for ``project_id``: the settings win, field by field, over /setup's values.

    Raises:
        ConfigError: neither source gives a URL and a key, naming the env vars to set.
    """
    stored = remembered(settings, project_id)
    url = settings.label_studio_url or (stored.url if stored else None)
    key = settings.label_studio_api_key or (stored.api_key if stored else None)
    if not url or not key:
        missing = [n for n, v in (("LABEL_STUDIO_URL", url), ("LABEL_STUDIO_API_KEY", key)) if not v]
        raise ConfigError(
            f"No Label Studio connection for project {project_id}: set {' and '.join(missing)} for the backend "
            "(and its workers), or connect the model in Label Studio so that /setup sends its host and token."
        )
    return LSConnection(url=url.rstrip("/"), api_key=key)


def forget_all() -> None:
    """Drop the in-memory connections (the files stay); used when settings change in one process."""
    with _lock:
        _memory.clear()
