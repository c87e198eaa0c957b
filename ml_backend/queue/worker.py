"""``taxomoco worker``: an RQ worker that runs training jobs (usually on a GPU machine).

The worker listens on the pretrain queue first, then the heads queue (``settings.pretrain_queue``,
``settings.heads_queue``). It imports torch, torchvision, lightly and the model modules once before it
forks a work-horse per job, so a job starts warm. Each job runs in a forked work-horse: a job that
crashes or is SIGKILLed (out of memory) is marked failed and retried (``Retry(max=JOB_RETRIES)``), the
worker itself keeps going. Device: ``settings.device`` (``DEVICE``): ``auto`` picks CUDA when present.
The settings this worker was started with are handed to the jobs it runs (:func:`ml_backend.training.jobs.use_settings`),
so CLI overrides such as ``--device cuda:1`` apply to them.

Several GPUs: start one worker per GPU (``DEVICE=cuda:0``, ``DEVICE=cuda:1``, …, or
``CUDA_VISIBLE_DEVICES``), all on the same queues; each takes whole jobs. One pretraining on several GPUs
is data-parallel training through Lightning (``PretrainConfig`` devices/strategy, DDP) — see
``docker/README.md``.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import time

import redis
import torch
from rq import Queue, Worker

from ml_backend.labelstudio.sdk import preload_sdk
from ml_backend.queue.rq_queue import record_lost_run
from ml_backend.settings import Settings
from ml_backend.training import jobs
from model.errors import ConfigError

__all__ = [
    "JOB_MONITORING_INTERVAL_S",
    "MAINTENANCE_INTERVAL_S",
    "WARM_MODULES",
    "build_worker",
    "describe_device",
    "healthcheck",
    "run_worker",
    "warm_imports",
]

log = logging.getLogger(__name__)

WARM_MODULES = ("ml_backend.training.jobs", "lightly", "pytorch_lightning", "model.ssl.pretrain")
"""Imported once in the worker before forking, so each work-horse inherits them: what every run imports, and
pretraining's Lightning and lightly (a fork inherits them for free)."""

JOB_MONITORING_INTERVAL_S = 10
"""How often the worker heartbeats a running job; an abandoned job is retried ~60 s after its last beat."""

MAINTENANCE_INTERVAL_S = 60
"""How often a worker cleans the queue registries (this is when abandoned jobs of dead workers are retried)."""


def warm_imports() -> dict[str, float]:
    """Import the heavy modules now; returns seconds per module (a missing optional one is logged)."""
    took: dict[str, float] = {}
    for name in WARM_MODULES:
        start = time.monotonic()
        try:
            importlib.import_module(name)
        except ImportError as exc:
            log.warning("Worker warm-up: %s not importable (%s); jobs will import what they need.", name, exc)
            continue
        took[name] = round(time.monotonic() - start, 2)
    start = time.monotonic()

    preload_sdk()
    took["label_studio_sdk"] = round(time.monotonic() - start, 2)
    return took


def describe_device(settings: Settings) -> str:
    """The device jobs of this worker will use, in words (``auto`` resolved)."""
    if settings.device != "auto":
        return settings.device
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.device_count()} visible: {torch.cuda.get_device_name(0)})"
    return "cpu"


def build_worker(settings: Settings, queues: list[str] | None = None, name: str | None = None) -> Worker:
    """An RQ worker for the given queues (default: pretrain queue first, then heads queue).

    Raises:
        ConfigError: no ``REDIS_URL`` is set.
    """
    if not settings.redis_url:
        raise ConfigError("`taxomoco worker` needs REDIS_URL (the same Redis as the server's REDIS_URL).")
    queue_names = queues or [settings.pretrain_queue, settings.heads_queue]
    connection = redis.Redis.from_url(settings.redis_url)
    return Worker(
        [Queue(q, connection=connection) for q in queue_names],
        connection=connection,
        name=name or f"taxomoco-{socket.gethostname()}-{int(time.time() * 1000) % 10**8}",
        job_monitoring_interval=JOB_MONITORING_INTERVAL_S,
        maintenance_interval=MAINTENANCE_INTERVAL_S,
        work_horse_killed_handler=_record_killed_horse,
    )


def _record_killed_horse(job, retpid: int, ret_val: int, rusage: object) -> None:  # type: ignore[no-untyped-def]
    """Record a job whose work-horse died (SIGKILL by the OOM killer or a person) in its project's record."""
    what = f"work-horse killed by signal {os.WTERMSIG(ret_val)}" if ret_val and os.WIFSIGNALED(ret_val) \
        else f"work-horse exited with status {ret_val}"
    record_lost_run(job, what)


def run_worker(settings: Settings, queues: list[str] | None = None, burst: bool = False, warm: bool = True) -> bool:
    """Run an RQ worker until stopped (or, with ``burst``, until the queues are empty).

    Args:
        settings: process settings (``redis_url``, queue names, ``device``, ``log_level``).
        queues: queue names in priority order; default pretrain queue, then heads queue.
        burst: exit when no job is left instead of waiting for more.
        warm: import torch/lightly/the model modules before the first job (off only in tests of the queue).

    Returns:
        True when the worker performed at least one job.
    """
    jobs.use_settings(settings)
    took = warm_imports() if warm else {}
    if settings.torch_threads:

        torch.set_num_threads(settings.torch_threads)
    worker = build_worker(settings, queues)
    log.info(
        "Worker %s on %s, queues %s, device %s; warm imports %s.",
        worker.name,
        _redact(settings.redis_url),
        ", ".join(worker.queue_names()),
        describe_device(settings) if warm else settings.device,
        took,
    )
    return bool(worker.work(burst=burst, logging_level=settings.log_level, with_scheduler=False))


def _redact(url: str | None) -> str | None:
    if not url or "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def healthcheck(settings: Settings | None = None) -> int:
    """Exit status for a container healthcheck: 0 when Redis answers and a worker of this host is registered.

    Run as ``python -c "import sys; from ml_backend.queue.worker import healthcheck; sys.exit(healthcheck())"``.
    """
    settings = settings or Settings.from_env()
    if not settings.redis_url:
        print("REDIS_URL is not set")
        return 1
    try:
        connection = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        prefix = f"taxomoco-{socket.gethostname()}-"
        names = [w.name for w in Worker.all(connection=connection)]
    except redis.RedisError as exc:
        print(f"Redis unreachable: {exc}")
        return 1
    if not any(name.startswith(prefix) for name in names):
        print(f"no RQ worker of this host ({prefix}*) is registered; registered: {names}")
        return 1
    return 0
