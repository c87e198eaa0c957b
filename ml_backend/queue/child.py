"""The training child process of the embedded scheduler: one job per process, started warm.

A child is forked from ``multiprocessing``'s fork server (:class:`ml_backend.queue.embedded.EmbeddedScheduler`
starts it), imports the job's module and warms up, tells its scheduler that it is ready, then waits on its pipe
for one job, runs it, sends the outcome and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from dataclasses import dataclass
from typing import Any

from ml_backend.queue.base import import_job_func
from ml_backend.settings import Settings

__all__ = ["PRELOAD", "TrainingChild", "child_main"]

PRELOAD = ("label_studio_sdk", "label_studio_sdk.projects.client", "sklearn.linear_model")
"""Modules the fork server imports once besides the job's own module: what ``warm_up`` and the first training
would import in each child (the SDK; scikit-learn for the logistic heads, about 1 s)."""


def child_main(conn: Any, job_func: str, settings: Settings) -> None:
    """Entry point of a training child process: warm up, wait for one job, run it, send the outcome, exit.

    Warm-up imports the job's module (``ml_backend.training.jobs`` imports torch, the model code and the Label
    Studio client) and calls its ``warm_up()`` when it has one, so a job handed to a waiting child starts at once.
    The job arrives as ``(project_id, model_dir, force_pretrain)``; the answer is ``("ok", result)``,
    ``("error", reason)`` (the job recorded it) or ``("unrecorded-error", reason)`` (nothing ran). A child
    whose scheduler goes away before a job arrives just exits. The server's settings (CLI overrides
    included) are handed to the job module's ``use_settings()`` when it has one
    (``ml_backend.training.jobs.use_settings``).
    """
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s [train %(process)d] %(name)s: %(message)s")
    try:
        os.nice(10)  # serving keeps priority over training on a shared machine
        if settings.torch_threads:
            import torch  # heavy: only when the setting asks (a real job imports it with its module anyway)

            torch.set_num_threads(settings.torch_threads)
        func, import_error = None, None
        try:
            func = import_job_func(job_func)
        except BaseException as exc:  # nothing ran, so nothing was recorded: the parent records it
            import_error = f"cannot import job {job_func!r}: {type(exc).__name__}: {exc}"
        module = sys.modules.get(getattr(func, "__module__", ""))
        use_settings = getattr(module, "use_settings", None)
        if callable(use_settings):
            use_settings(settings)
        warm_up = getattr(module, "warm_up", None)
        if callable(warm_up):
            try:
                warm_up()
            except Exception as exc:  # the job imports what it needs itself; only its start is slower
                logging.getLogger(__name__).warning("Training process warm-up failed: %s: %s",
                                                    type(exc).__name__, exc)
        try:
            conn.send(("ready", None))  # the scheduler's health shows a warm spare
            project_id, model_dir, force_pretrain = conn.recv()
        except (EOFError, OSError):  # the scheduler closed (or its server stopped) before handing out a job
            return
        if func is None:
            conn.send(("unrecorded-error", import_error))
            return
        try:
            result = func(project_id, model_dir, force_pretrain)
        except BaseException as exc:  # the job boundary: the job recorded it; tell the parent, never hang it
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
            return
        conn.send(("ok", result))
    finally:
        conn.close()


@dataclass
class TrainingChild:
    """A training process and the parent's end of its pipe."""

    process: multiprocessing.process.BaseProcess
    conn: Any
    ready: bool = False  # its warm-up finished (it sent "ready")

    def poll_ready(self) -> bool:
        """Whether the child finished warming up (reads its "ready" message when it has arrived)."""
        if not self.ready and self.process.is_alive():
            try:
                if self.conn.poll(0) and self.conn.recv()[0] == "ready":
                    self.ready = True
            except (EOFError, OSError):
                pass
        return self.ready
