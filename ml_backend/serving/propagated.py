"""Propagated predictions served before a project has a model (``/setup``'s version, ``/predict``'s items).

From the first label until the heads train, training runs write a propagation version
(``ml_backend.training.propagation``): every reached task's taxonomy path. While the project has no model version,
``/setup`` reports the live propagation version and ``/predict`` answers each task with its stored path (a task the
version does not hold — not reached, imported later, unusable image — gets an empty item). The pointer
(``propagation/LIVE``) is read at most once per :data:`CHECK_INTERVAL_S` per project; a version's file is read once
and kept for the :data:`MAX_PROJECTS` projects asked last.
"""

from __future__ import annotations

import logging
import threading

from cachetools import LRUCache, TTLCache

from ml_backend.settings import Settings
from ml_backend.training.propagation import Propagated, live_propagation, read_propagated
from model.errors import DataError

__all__ = ["CHECK_INTERVAL_S", "MAX_PROJECTS", "PropagatedStore"]

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0
MAX_PROJECTS = 64


class PropagatedStore:
    """The live propagation version of each project, for serving.

    Args:
        settings: where the projects are (``MODEL_DIR``) and whether propagation is on (``PROPAGATION``).
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._versions: TTLCache[int, str | None] = TTLCache(4096, CHECK_INTERVAL_S)
        self._data: LRUCache[int, Propagated] = LRUCache(MAX_PROJECTS)
        self._lock = threading.Lock()

    def version(self, project_id: int) -> str | None:
        """The project's live propagation version (None: none, or ``PROPAGATION`` off); a small file read at most
        once a second."""
        if not self.settings.propagation:
            return None
        pid = int(project_id)
        with self._lock:
            if pid in self._versions:
                return self._versions[pid]
        version = live_propagation(self.settings.project(pid))
        with self._lock:
            self._versions[pid] = version
        return version

    def get(self, project_id: int) -> Propagated | None:
        """The live propagation version's predictions (read from disk when the version changed), or None."""
        pid = int(project_id)
        version = self.version(pid)
        if version is None:
            return None
        with self._lock:
            held = self._data.get(pid)
        if held is not None and held.version == version:
            return held
        try:
            loaded = read_propagated(self.settings.project(pid), version)
        except DataError as exc:  # damaged: no predictions until the next run rewrites it (logged)
            log.warning("project %s: %s", pid, exc)
            return None
        if loaded is not None:
            with self._lock:
                self._data[pid] = loaded
        return loaded
