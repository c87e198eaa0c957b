"""The backend as the real-server benchmarks drive it: ``taxomoco serve`` on the product's defaults and a small client.

:class:`DefaultsBackend` starts ``taxomoco serve`` (``tests/servers.py``'s server) with the fast-training settings of
the tests undone, so a benchmark runs the product's defaults plus the public settings it names. :class:`BackendClient`
asks one project's state the way Label Studio and an operator do: ``/setup`` (the live model version), ``/job_status``
(the jobs, the pre-annotation) and whether nothing runs or waits (:meth:`BackendClient.idle`). Used by
``bench/retrain_latency.py`` and ``bench/health_under_load.py``.
"""

from __future__ import annotations

import os
import time
from datetime import datetime
from typing import Any

import numpy as np
import requests

from tests.servers import FAST_TRAINING_ENV, BackendServer, wait_until

__all__ = ["AUTH", "BackendClient", "DefaultsBackend", "iso_ts", "pct"]

AUTH = ("taxomoco-bench", "bench-pass-1234")
"""The backend's Basic auth (BASIC_AUTH_USER / BASIC_AUTH_PASS: /job_status needs it; Label Studio's model connection
and the backend's own webhook carry it)."""


def iso_ts(text: str) -> float:
    """Epoch seconds of an ISO-8601 time string (``Z`` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile of ``values`` (NaN when empty)."""
    return float(np.percentile(values, q)) if values else float("nan")


class DefaultsBackend(BackendServer):
    """``taxomoco serve`` on the product's defaults: ``tests/servers.py``'s fast-training settings undone."""

    def environment(self) -> dict[str, str]:
        env = super().environment()
        for name in FAST_TRAINING_ENV:
            if name == "OMP_NUM_THREADS":
                if name in os.environ:
                    env[name] = os.environ[name]
                else:
                    env.pop(name, None)
            else:
                env[name] = ""  # an empty value is the setting's default (Settings.from_env)
        env.update(self.extra_env)
        return {k: v for k, v in env.items() if v != ""}


class BackendClient:
    """One project's view of the backend at ``url`` (Basic auth :data:`AUTH`).

    Args:
        url: the backend's base URL.
        project: the Label Studio project id.
        label_config: the project's labeling config (sent in /setup, as Label Studio does).
        ls_url: Label Studio's URL (the /setup ``hostname``).
        ls_token: a Label Studio token (the /setup ``access_token``).
    """

    def __init__(self, url: str, project: int, label_config: str, ls_url: str, ls_token: str) -> None:
        self.url, self.project, self.label_config = url, project, label_config
        self.ls_url, self.ls_token = ls_url, ls_token

    def setup_body(self) -> dict[str, Any]:
        """The body Label Studio posts to /setup."""
        return {"project": f"{self.project}.1700000000", "schema": self.label_config, "hostname": self.ls_url,
                "access_token": self.ls_token, "model_version": ""}

    def version(self) -> str:
        """The live model version /setup reports (``untrained`` before the first publish)."""
        r = requests.post(f"{self.url}/setup", json=self.setup_body(), auth=AUTH, timeout=10)
        r.raise_for_status()
        return str(r.json()["model_version"])

    def job_status(self) -> dict[str, Any]:
        """The project's /job_status record."""
        r = requests.post(f"{self.url}/job_status", json={"project": self.project}, auth=AUTH, timeout=10)
        r.raise_for_status()
        return dict(r.json())

    def idle(self) -> bool:
        """No job runs or waits and no pre-annotation is being written."""
        return _idle(self.job_status())

    def wait_idle(self, stall_s: float, poll_s: float = 0.5) -> None:
        """Wait until :meth:`idle`, for as long as the backend makes progress: a clean-up of 8,000 predictions takes
        minutes, and its record (``prelabel``: ``cleanup_done``, ``updated_at``) moves every few seconds meanwhile.

        Raises:
            RuntimeError: nothing in /job_status changed for ``stall_s`` seconds while the backend was busy.
        """
        last, moved = None, time.monotonic()
        while True:
            s = self.job_status()
            if _idle(s):
                return
            if s != last:
                last, moved = s, time.monotonic()
            elif time.monotonic() - moved > stall_s:
                raise RuntimeError(f"the backend stayed busy with no progress in /job_status for {stall_s:g} s")
            time.sleep(poll_s)

    def wait_first_model(self, timeout_s: float) -> None:
        """Wait until a first version is live and the backend is idle again (its pre-annotation written).

        Raises:
            RuntimeError: no version within ``timeout_s``, or still busy ``timeout_s`` after it.
        """
        if not wait_until(lambda: self.version() != "untrained", timeout_s, 1.0):
            raise RuntimeError(f"the first training did not publish within {timeout_s:g} s")
        if not wait_until(self.idle, timeout_s, 1.0):
            raise RuntimeError(f"the backend stayed busy {timeout_s:g} s after the first training")


def _idle(status: dict[str, Any]) -> bool:
    """Whether a /job_status record shows no job running or waiting and no pre-annotation being written."""
    return not status.get("running") and not status.get("queued") and \
        (status.get("prelabel") or {}).get("state") != "running"
