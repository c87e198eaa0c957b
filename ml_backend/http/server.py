"""Run the app under gunicorn (gthread workers) inside this process: ``serve(settings)``.

The app is built in each worker process after the fork (not in the master), so the model store's and the
embedded scheduler's threads live where requests are served. Without ``REDIS_URL`` keep one worker (the
embedded trainer is per process; settings validation enforces it) and raise ``TAXOMOCO_HTTP_THREADS``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from gunicorn.app.base import BaseApplication

from ml_backend.http.app import create_app
from ml_backend.settings import Settings

__all__ = ["SWITCH_INTERVAL_S", "TaxomocoServer", "WORKER_TIMEOUT_S", "gunicorn_options", "serve"]

log = logging.getLogger(__name__)

WORKER_TIMEOUT_S = 120
"""gunicorn's worker timeout: above Label Studio's 100 s /predict read timeout."""

SWITCH_INTERVAL_S = 0.001
"""Python's GIL switch interval in workers (default 5 ms): a short request such as /health waiting for the
GIL behind busy /predict threads gets it sooner."""


def _post_worker_init(worker: Any) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)


class TaxomocoServer(BaseApplication):
    """gunicorn application that serves :func:`ml_backend.http.app.create_app` (settings passed in, not argv).

    Args:
        settings: the process settings (host, port, workers, threads, log level).
        app_factory: builds the WSGI app in the worker; default ``create_app(settings)``.
        options: extra gunicorn settings (e.g. ``{"accesslog": "-"}``).
    """

    def __init__(self, settings: Settings, app_factory: Any = None, options: dict[str, Any] | None = None) -> None:
        self.settings = settings
        self.app_factory = app_factory
        self.options = gunicorn_options(settings) | (options or {})
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings and value is not None:
                self.cfg.set(key, value)

    def init(self, parser: Any, opts: Any, args: Any) -> None:  # argv is not read
        return None

    def load(self) -> Any:
        if self.app_factory is not None:
            return self.app_factory(self.settings)

        return create_app(self.settings)


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """gunicorn settings derived from ours."""
    return {
        "bind": f"{settings.host}:{settings.port}",
        "workers": settings.http_workers,
        "threads": settings.http_threads,
        "worker_class": "gthread",
        "timeout": WORKER_TIMEOUT_S,
        "graceful_timeout": 30,
        "keepalive": 5,
        "loglevel": settings.log_level.lower(),
        "errorlog": "-",
        "preload_app": False,
        "proc_name": "taxomoco",
        "post_worker_init": _post_worker_init,
        "control_socket_disable": True,  # gunicorn's runtime control socket is one fixed path per user
    }


def serve(settings: Settings, options: dict[str, Any] | None = None) -> None:
    """Serve until stopped (SIGINT/SIGTERM); blocks.

    Args:
        settings: the process settings.
        options: extra gunicorn settings overriding the derived ones.
    """
    log.info(
        "taxomoco serving on %s:%s (%d worker(s) x %d threads)", settings.host, settings.port, settings.http_workers, settings.http_threads
    )
    TaxomocoServer(settings, options=options).run()
