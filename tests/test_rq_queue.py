"""The RQ scheduler and worker against a real redis-server (``redis_url`` / ``redis_server`` fixtures).

Jobs are ``tests.test_scheduler.recording_job`` (train_project's signature and record keeping; it logs its
start/end, sleeps, fails or publishes a version as its control file says). Workers are real forking RQ
workers: in-process ``work(burst=True)`` or ``run_worker`` in subprocesses that the tests SIGKILL.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rq import Queue
from rq.job import Job
from rq.registry import StartedJobRegistry

from ml_backend.paths import ProjectPaths
from ml_backend.queue.factory import make_scheduler
from ml_backend.queue.rq_queue import RQScheduler, job_ids
from ml_backend.queue.worker import build_worker
from ml_backend.settings import Settings
from ml_backend.training.policy import write_pretrain_record
from ml_backend.training.records import JobOutcome, JobRecords
from tests.servers import REPO_ROOT, stop_process, wait_until
from tests.test_scheduler import live_version, read_runs, set_control

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

JOB = "tests.test_scheduler.recording_job"


def make_settings(tmp_path: Path, redis_url: str, **overrides: object) -> Settings:
    return Settings.from_env(env={}, model_dir=tmp_path, redis_url=redis_url, **overrides)


@pytest.fixture
def settings(tmp_path: Path, redis_url: str) -> Settings:
    return make_settings(tmp_path, redis_url)


@pytest.fixture
def scheduler(settings: Settings):
    s = make_scheduler(settings, job_func=JOB)
    try:
        yield s
    finally:
        s.close()


def burst(settings: Settings) -> None:
    """Run a real forking RQ worker in this process until the queues are empty."""
    build_worker(settings).work(burst=True, logging_level="WARNING")


def start_worker(settings: Settings, log: Path) -> subprocess.Popen:
    """``run_worker`` in a child process (own process group) listening on both queues."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from ml_backend.settings import Settings\n"
        "from ml_backend.queue.worker import run_worker\n"
        f"run_worker(Settings.from_env(env={{}}, model_dir={str(settings.model_dir)!r}, "
        f"redis_url={settings.redis_url!r}), warm=False)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def starts(model_dir: Path, pid: int) -> list[list[str]]:
    return [r for r in read_runs(model_dir, pid) if r[0] == "start"]


def complete_versions(model_dir: Path, pid: int) -> list[str]:
    versions = ProjectPaths(model_dir, pid).models / "versions"
    names = [p.name for p in versions.iterdir() if not p.name.startswith(".")] if versions.exists() else []
    for name in names:  # a visible version is always whole
        assert (versions / name / "manifest.json").exists(), f"half-written version {name}"
    return names


def test_make_scheduler_with_redis_url_is_rq(scheduler, redis_url: str) -> None:
    assert isinstance(scheduler, RQScheduler)
    health = scheduler.health()
    assert health["ok"] is True and health["redis"] == "ok" and health["workers"] == 0


def test_enqueue_worker_runs_job_and_publishes(scheduler, settings: Settings, tmp_path: Path) -> None:
    set_control(tmp_path, 1)
    out = scheduler.schedule(1, "ANNOTATION_CREATED")
    assert out["action"] == "queued" and out["job_id"] == job_ids(1)[0]
    assert out["queue"] == settings.pretrain_queue  # never pretrained: the heavy queue (settings: no minimum)
    assert scheduler.status(1)["queued"] is True and scheduler.status(1)["queued_reason"] == "ANNOTATION_CREATED"
    burst(settings)
    status = scheduler.status(1)
    assert status["last_outcome"] == "succeeded" and status["queued"] is False and status["running"] is False
    assert status["last_success"]["job_id"] == job_ids(1)[0]
    assert live_version(tmp_path, 1) == status["last_success"]["version"]
    # the slot id is reused for the next run (its finished job is replaced), now on the heads queue
    write_pretrain_record(settings.project(1), 10, "enc1")
    again = scheduler.schedule(1, "ANNOTATION_UPDATED")
    assert again["action"] == "queued" and again["queue"] == settings.heads_queue
    burst(settings)
    assert scheduler.status(1)["counts"]["succeeded"] == 2 and len(complete_versions(tmp_path, 1)) == 2


def test_a_project_too_small_to_pretrain_goes_to_the_heads_queue(settings: Settings) -> None:
    JobRecords(settings.project(5)).mark_finished(JobOutcome.SUCCEEDED, 1.0, "j1", version="v1", result={
        "pretrain": {"pretrain": False, "reason": "too few images", "n_images": 120}})
    small = make_scheduler(dataclasses.replace(settings, pretrain_min_images=500), job_func=JOB)
    grown = make_scheduler(dataclasses.replace(settings, pretrain_min_images=100), job_func=JOB)
    try:
        assert isinstance(small, RQScheduler) and isinstance(grown, RQScheduler)
        assert small.queue_for(5, force_pretrain=False) == settings.heads_queue
        assert small.queue_for(5, force_pretrain=True) == settings.pretrain_queue
        # grown past the minimum: its first pretraining goes to the heavy queue
        assert grown.queue_for(5, force_pretrain=False) == settings.pretrain_queue
        # a project that never trained, whose cold-start run (a skip) found it small
        JobRecords(settings.project(6)).mark_finished(JobOutcome.SKIPPED, 1.0, "j2", reason="need 4 more labels", result={
            "cold_start": {"pretrain": {"pretrain": False, "reason": "too few images", "n_images": 120}}})
        assert small.queue_for(6, force_pretrain=False) == settings.heads_queue
        assert grown.queue_for(6, force_pretrain=False) == settings.pretrain_queue
    finally:
        small.close()
        grown.close()


def test_burst_of_100_webhooks_runs_at_most_twice(scheduler, settings: Settings, tmp_path: Path) -> None:
    set_control(tmp_path, 2, sleep=1.5)
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        actions = [scheduler.schedule(2, "ANNOTATION_CREATED")["action"]]
        assert wait_until(lambda: bool(starts(tmp_path, 2)), 30), (tmp_path / "worker.log").read_text()
        t0 = time.perf_counter()
        actions += [scheduler.schedule(2, "ANNOTATION_UPDATED")["action"] for _ in range(99)]
        per_call = (time.perf_counter() - t0) / 99
        assert actions[0] == "queued" and actions[1] == "follow-up" and set(actions[2:]) == {"coalesced"}
        assert per_call < 0.05, per_call
        assert wait_until(lambda: scheduler.status(2)["counts"]["succeeded"] == 2, 60)
        time.sleep(1.0)
        assert len(starts(tmp_path, 2)) == 2
        status = scheduler.status(2)
        assert status["counts"]["coalesced"] == 98 and not status["queued"] and not status["running"]
    finally:
        stop_process(worker)


def test_killed_work_horse_is_retried_and_old_version_served(scheduler, settings: Settings, tmp_path: Path) -> None:
    set_control(tmp_path, 3)
    scheduler.schedule(3, "START_TRAINING")
    burst(settings)
    v1 = live_version(tmp_path, 3)
    assert v1 is not None
    set_control(tmp_path, 3, sleep=2.5)  # the job writes half a version, then sleeps 2.5 s
    workers = [start_worker(settings, tmp_path / f"worker{i}.log") for i in range(2)]
    try:
        scheduler.schedule(3, "ANNOTATION_CREATED")
        assert wait_until(lambda: len(starts(tmp_path, 3)) == 2, 30)
        horse = int(starts(tmp_path, 3)[-1][1])
        time.sleep(0.5)
        os.kill(horse, signal.SIGKILL)  # kill -9 of the forked work-horse mid-job
        seen = set()
        deadline = time.monotonic() + 60
        while scheduler.status(3)["counts"]["succeeded"] < 2 and time.monotonic() < deadline:
            seen.add(live_version(tmp_path, 3))
            complete_versions(tmp_path, 3)  # never a half-written visible version
            time.sleep(0.05)
        status = scheduler.status(3)
        assert status["counts"]["succeeded"] == 2, status
        assert seen <= {v1, live_version(tmp_path, 3)}  # the old version was served until the new one
        assert len(starts(tmp_path, 3)) == 3  # first run, killed attempt, retry
        assert status["counts"]["failed"] == 1 and "work-horse killed by signal 9" in status["last_failure"]["reason"]
        assert "retried" in status["last_failure"]["reason"] and status["running_job_id"] is None
        assert live_version(tmp_path, 3) != v1 and len(complete_versions(tmp_path, 3)) == 2
    finally:
        for w in workers:
            stop_process(w)


def test_job_of_a_dead_worker_is_retried_by_another(scheduler, settings: Settings, tmp_path: Path) -> None:
    set_control(tmp_path, 4, sleep=30)
    worker = start_worker(settings, tmp_path / "dying.log")
    scheduler.schedule(4, "ANNOTATION_CREATED")
    assert wait_until(lambda: bool(starts(tmp_path, 4)), 30)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its horse die together (machine lost)
    worker.wait()
    horse = int(starts(tmp_path, 4)[0][1])  # the work-horse has its own process group: kill it too
    if _alive(horse):
        os.kill(horse, signal.SIGKILL)
    job = Job.fetch(job_ids(4)[0], connection=scheduler.redis)
    assert job.get_status() == "started"  # nobody knows yet
    # rq retries it once the execution heartbeat (monitoring interval + 60 s) expired and a worker's
    # registry maintenance runs; we run that maintenance with a clock 2 minutes ahead instead of waiting.
    registry = StartedJobRegistry(job.origin, connection=scheduler.redis)
    registry.cleanup(timestamp=time.time() + 120)
    job.refresh()
    assert job.get_status() == "queued" and job.retries_left == settings.job_retries - 1
    lost = scheduler.status(4)
    assert lost["last_outcome"] == "failed" and "worker running it died" in lost["last_failure"]["reason"]
    assert lost["running_job_id"] is None and lost["queued"] is True
    set_control(tmp_path, 4)
    burst(settings)
    status = scheduler.status(4)
    assert status["last_outcome"] == "succeeded" and len(starts(tmp_path, 4)) == 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_failing_job_records_reason_and_does_not_poison_queue(scheduler, settings: Settings, tmp_path: Path) -> None:
    set_control(tmp_path, 5, fail="label config has no Taxonomy or Choices tag")
    set_control(tmp_path, 6)
    scheduler.schedule(5, "START_TRAINING")
    scheduler.schedule(6, "START_TRAINING")
    burst(settings)
    failed = scheduler.status(5)
    assert failed["last_outcome"] == "failed" and "no Taxonomy or Choices tag" in failed["last_failure"]["reason"]
    assert failed["counts"]["failed"] == 1 + settings.job_retries  # first attempt + retries
    assert scheduler.status(6)["last_outcome"] == "succeeded"  # the other project ran
    set_control(tmp_path, 5)
    assert scheduler.schedule(5, "ANNOTATION_UPDATED")["action"] == "queued"  # the failed id is reused
    burst(settings)
    assert scheduler.status(5)["last_outcome"] == "succeeded"


def test_redis_down_answers_fast_and_recovers(scheduler, settings: Settings, redis_server, tmp_path: Path) -> None:
    set_control(tmp_path, 7)
    redis_server.stop()
    t0 = time.perf_counter()
    out = scheduler.schedule(7, "ANNOTATION_CREATED")
    took = time.perf_counter() - t0
    assert out["action"] == "error" and "unreachable" in out["reason"] and took < 1.5, (out, took)
    health = scheduler.health()
    assert health["ok"] is False and health["redis"].startswith("unreachable")
    assert scheduler.status(7)["queue_error"].startswith("Redis unreachable")
    redis_server.start()
    assert scheduler.health()["ok"] is True
    assert scheduler.schedule(7, "ANNOTATION_UPDATED")["action"] == "queued"
    burst(settings)
    assert scheduler.status(7)["last_outcome"] == "succeeded"


def test_redis_restart_between_enqueue_and_pickup(scheduler, settings: Settings, redis_server, tmp_path: Path) -> None:
    """Without persistence (``--save ''``) a restart loses the queue; the next event re-enqueues."""
    set_control(tmp_path, 8)
    assert scheduler.schedule(8, "ANNOTATION_CREATED")["action"] == "queued"
    redis_server.restart()
    assert scheduler.status(8)["queued"] is False  # the record does not pretend the job still waits
    burst(settings)
    assert starts(tmp_path, 8) == []  # the job was lost with the queue
    assert scheduler.schedule(8, "ANNOTATION_UPDATED")["action"] == "queued"
    burst(settings)
    assert scheduler.status(8)["last_outcome"] == "succeeded"


def test_both_queues_are_listened_to_pretrain_first(settings: Settings) -> None:
    worker = build_worker(settings)
    assert worker.queue_names() == [settings.pretrain_queue, settings.heads_queue]
    assert [q.name for q in worker.queues] == worker.queue_names()
    assert Queue(settings.heads_queue, connection=worker.connection).count == 0


def test_forced_pretraining_folded_into_a_waiting_job_is_kept(scheduler, settings: Settings, tmp_path: Path) -> None:
    from ml_backend.training.policy import clear_pretrain_request, pretrain_requested

    write_pretrain_record(settings.project(9), 10, "enc")
    assert scheduler.schedule(9, "ANNOTATION_CREATED")["queue"] == settings.heads_queue
    out = scheduler.schedule(9, "TRAIN", force_pretrain=True)
    assert out["action"] == "coalesced"
    assert pretrain_requested(settings.project(9))  # the waiting job's train_project will see it
    clear_pretrain_request(settings.project(9))
    assert scheduler.queue_for(9, force_pretrain=False) == settings.heads_queue


def test_health_warns_without_workers_and_run_worker_burst_returns(settings: Settings, scheduler) -> None:
    from ml_backend.queue.worker import run_worker

    assert "no `taxomoco worker`" in scheduler.health()["warning"]
    assert run_worker(settings, burst=True) is False  # warm imports (torch, lightly, model), empty queues
