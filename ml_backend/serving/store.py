"""Per-project live models, loaded in background threads and swapped in by one reference.

The store never loads a model in the caller's thread: :meth:`ModelStore.version` and :meth:`ModelStore.get`
read the project's ``LIVE`` pointer (at most every ``check_interval_s``, 0.2 s, per project: one small file read;
plus a watcher thread that does the same for every project seen once a second), start a background load when it
names a version other than the one being served, and keep serving the old version until the new one is completely
built. (With one probe a second, a new version reached /setup 1.2 s after its publish at the median under a labeling
stream, ``bench/results/retrain_latency_stream.txt``.) A version that failed to
load is retried after ``retry_after_s``; meanwhile the previous version (if any) stays live.

Version reporting (what /setup answers and every prediction carries):

* a model is served → its version;
* nothing served yet, a live version exists and is loading → that version (``get(wait_s=...)`` waits for it);
* otherwise → :data:`UNTRAINED` (and /predict answers with no predictions).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from ml_backend.serving.similar import ProjectNeighbors, load_project_neighbors
from ml_backend.settings import Settings
from model.bundle import list_versions, live_version, load_live
from model.predictor import Predictor

__all__ = ["Loader", "ModelStore", "NeighborsLoader", "Probe", "ServedModel", "UNTRAINED", "default_loader",
           "default_neighbors_loader", "default_probe"]

log = logging.getLogger(__name__)

UNTRAINED = "untrained"
"""The version reported before a project has a loadable model."""


class ServedModel(Protocol):
    """What the store serves (``model.predictor.Predictor``)."""

    version: str


Loader = Callable[[int], ServedModel]
Probe = Callable[[int], "str | None"]
NeighborsLoader = Callable[[int, ServedModel], "ProjectNeighbors | None"]


def default_probe(settings: Settings) -> Probe:
    """The live version of a project according to ``model.bundle.live_version`` (None before any)."""
    def probe(project_id: int) -> str | None:
        return live_version(settings.project(project_id).models)

    return probe


def default_loader(settings: Settings) -> Loader:
    """Build a ``model.predictor.Predictor`` of the project's live bundle and its embedding cache."""
    def load(project_id: int) -> ServedModel:
        bundle = load_live(settings.project(project_id).models)
        return Predictor(bundle, cache_dir=settings.project(project_id).cache, device=settings.device)

    return load


def default_neighbors_loader(settings: Settings) -> NeighborsLoader:
    """The similarity index of the served model's encoder (``ml_backend.serving.similar``); None when the model
    has no bundle manifest (a test double) or training has not built an index for its encoder yet."""
    def load(project_id: int, model: ServedModel) -> ProjectNeighbors | None:
        manifest = getattr(getattr(model, "bundle", None), "manifest", None)
        if manifest is None:
            return None
        return load_project_neighbors(settings.project(project_id), model.version, manifest.encoder_version)

    return load


@dataclass
class _Entry:
    served: ServedModel | None = None
    neighbors: ProjectNeighbors | None = None
    neighbors_error: str | None = None
    live: str | None = None
    loading: str | None = None
    last_check: float = -1e9
    error: str | None = None
    failed_version: str | None = None
    failed_at: float = 0.0
    loads: int = 0
    loaded_at: float | None = None
    probe_error: str | None = None


class ModelStore:
    """Live models of every project this process serves.

    Args:
        settings: the process settings (project directories, device).
        loader: builds the served model of a project's live version (default: bundle + Predictor).
        neighbors_loader: loads the similarity index beside the model (default: the index of its encoder); a
            failure there is recorded and leaves similarity search off for that version, never the model.
        probe: reads a project's live version cheaply (default: ``model.bundle.live_version``).
        check_interval_s: at most one probe per project per interval (requests).
        retry_after_s: wait this long before loading a version that failed again.
        watch: run a watcher thread that probes every known project (hot reload even when no request comes).
        watch_interval_s: the watcher's period (at least ``check_interval_s``).
    """

    def __init__(
        self,
        settings: Settings,
        loader: Loader | None = None,
        probe: Probe | None = None,
        neighbors_loader: NeighborsLoader | None = None,
        check_interval_s: float = 0.2,
        retry_after_s: float = 30.0,
        watch: bool = True,
        watch_interval_s: float = 1.0,
    ) -> None:
        self.settings = settings

        self._list_versions = list_versions
        self._loader = loader or default_loader(settings)
        self._neighbors_loader = neighbors_loader or default_neighbors_loader(settings)
        self._probe = probe or default_probe(settings)
        self.check_interval_s = check_interval_s
        self.watch_interval_s = max(watch_interval_s, check_interval_s)
        self.retry_after_s = retry_after_s
        self._entries: dict[int, _Entry] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="model-load")
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._watch = watch

    # ----- public ------------------------------------------------------------------------------------
    def version(self, project_id: int) -> str:
        """The version this process answers with for ``project_id`` (see the module docstring); fast."""
        self._check(project_id)
        with self._cond:
            entry = self._entries[int(project_id)]
            if entry.served is not None:
                return entry.served.version
            if entry.loading is not None:
                return entry.loading
            return UNTRAINED

    def get(self, project_id: int, wait_s: float = 0.0) -> ServedModel | None:
        """The served model of ``project_id``, or None before one is loaded.

        Args:
            project_id: the Label Studio project.
            wait_s: when nothing is served yet, probe now and, if a load runs, wait up to this long for it.
        """
        self._check(project_id)
        if wait_s > 0:
            with self._cond:
                entry = self._entries[int(project_id)]
                idle = entry.served is None and entry.loading is None
            if idle:  # nothing served: a version published within the check interval is worth a probe now
                self.refresh(project_id)
        deadline = time.monotonic() + max(0.0, wait_s)
        with self._cond:
            entry = self._entries[int(project_id)]
            while entry.served is None and entry.loading is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return entry.served

    def neighbors(self, project_id: int) -> ProjectNeighbors | None:
        """The similarity index loaded with the served model (None before a model, or without an index)."""
        self._check(project_id)
        with self._cond:
            entry = self._entries[int(project_id)]
            return entry.neighbors if entry.served is not None else None

    def status(self, project_id: int) -> dict[str, Any]:
        """What the store knows of a project: served/live/loading versions, last error (no probing)."""
        with self._cond:
            e = self._entries.get(int(project_id)) or _Entry()
            return {
                "served_version": e.served.version if e.served is not None else None,
                "live_version": e.live,
                "loading_version": e.loading,
                "loads": e.loads,
                "load_error": e.error,
                "neighbors_error": e.neighbors_error,
                "probe_error": e.probe_error,
            }

    def projects(self) -> list[int]:
        """Projects seen by this store, ascending."""
        with self._cond:
            return sorted(self._entries)

    def versions(self, project_id: int) -> list[str]:
        """Complete versions on disk for ``project_id`` (``model.bundle.list_versions``), newest first."""
        return list(reversed(list_versions(self.settings.project(project_id).models)))

    def refresh(self, project_id: int) -> None:
        """Probe ``project_id`` now (ignoring the interval), e.g. right after a training published."""
        with self._cond:
            self._entries.setdefault(int(project_id), _Entry()).last_check = -1e9
        self._check(project_id)

    def close(self) -> None:
        """Stop the watcher and the loader threads (a load in progress finishes in the background)."""
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ----- internals ---------------------------------------------------------------------------------
    def _ensure_watcher(self) -> None:
        if not self._watch or self._watcher is not None or self._stop.is_set():
            return
        self._watcher = threading.Thread(target=self._watch_loop, name="model-watch", daemon=True)
        self._watcher.start()

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.watch_interval_s):
            for pid in self.projects():
                try:
                    self._check(pid)
                except Exception:  # the watcher must survive anything one project does
                    log.exception("project %s: model check failed", pid)

    def _check(self, project_id: int) -> None:
        pid = int(project_id)
        now = time.monotonic()
        with self._cond:
            if self._watcher is None:
                self._ensure_watcher()
            entry = self._entries.setdefault(pid, _Entry())
            if now - entry.last_check < self.check_interval_s:
                return
            entry.last_check = now
        try:
            live = self._probe(pid)
            probe_error = None
        except Exception as exc:  # a broken LIVE pointer must not break /setup; keep serving
            live, probe_error = None, f"{exc.__class__.__name__}: {exc}"
            log.warning("project %s: cannot read the live model version: %s", pid, probe_error)
        with self._cond:
            if probe_error is not None:
                entry.probe_error = probe_error
                return
            entry.probe_error = None
            entry.live = live
            served = entry.served.version if entry.served is not None else None
            if live is None or live == served or entry.loading is not None or self._stop.is_set():
                return
            if live == entry.failed_version and now - entry.failed_at < self.retry_after_s:
                return
            entry.loading = live
        try:
            self._pool.submit(self._load, pid, live)
        except RuntimeError:  # closed meanwhile
            with self._cond:
                entry.loading = None

    def _load(self, pid: int, version: str) -> None:
        t0 = time.monotonic()
        try:
            model = self._loader(pid)
        except Exception as exc:  # end of a background load: record it, keep the old model
            log.exception("project %s: loading model version %s failed", pid, version)
            with self._cond:
                entry = self._entries[pid]
                entry.error = f"version {version}: {exc.__class__.__name__}: {exc}"
                entry.failed_version, entry.failed_at = version, time.monotonic()
                entry.loading = None
                self._cond.notify_all()
            return
        try:
            neighbors, neighbors_error = self._neighbors_loader(pid, model), None
        except Exception as exc:  # the model serves without similarity search; say why in /health and the log
            log.warning("project %s: similarity index of version %s not loaded: %s", pid, version, exc)
            neighbors, neighbors_error = None, f"{exc.__class__.__name__}: {exc}"
        with self._cond:
            entry = self._entries[pid]
            old = entry.served.version if entry.served is not None else None
            entry.served = model  # the one reference swap (the index with it)
            entry.neighbors, entry.neighbors_error = neighbors, neighbors_error
            entry.loading, entry.error, entry.failed_version = None, None, None
            entry.loads += 1
            entry.loaded_at = time.time()
            entry.last_check = -1e9  # re-probe on the next call: LIVE may have moved during the load
            self._cond.notify_all()
        log.info("project %s: serving model version %s (was %s), loaded in %.2f s", pid, model.version, old,
                 time.monotonic() - t0)
