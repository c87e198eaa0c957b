"""The embedded scheduler and the job records: coalescing, follow-up runs, failures recorded, crashes.

The jobs here are small importable functions with the signature of ``ml_backend.training.jobs.train_project``
(``tests.test_scheduler.recording_job``) that log their start and end to a file, sleep, fail or die as a
per-project control file says, and publish a "version" directory the way a model bundle is published
(written whole under a temporary name, then one pointer replaced). The RQ tests reuse them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ml_backend.paths import ProjectPaths
from ml_backend.queue.base import ScheduleAction
from ml_backend.queue.factory import make_scheduler
from ml_backend.settings import Settings
from ml_backend.training.records import JobOutcome, JobRecords, run_recorded
from tests.servers import wait_until

JOB = "tests.test_scheduler.recording_job"


# --------------------------------------------------------------------------------------------------------
# The test job (runs in spawned children and in RQ work horses)
# --------------------------------------------------------------------------------------------------------


def control_path(model_dir: str | Path, project_id: int) -> Path:
    return Path(model_dir) / f"control-{project_id}.json"


def runs_path(model_dir: str | Path, project_id: int) -> Path:
    return Path(model_dir) / f"runs-{project_id}.log"


def set_control(model_dir: str | Path, project_id: int, **control: Any) -> None:
    """What the next runs of ``recording_job`` do: ``sleep`` seconds, ``fail`` with a message, ``die``
    (SIGKILL itself mid-run), ``die_once`` (die on the first attempt only)."""
    Path(model_dir).mkdir(parents=True, exist_ok=True)
    control_path(model_dir, project_id).write_text(json.dumps(control))


def read_runs(model_dir: str | Path, project_id: int) -> list[list[str]]:
    try:
        return [line.split() for line in runs_path(model_dir, project_id).read_text().splitlines()]
    except FileNotFoundError:
        return []


def live_version(model_dir: str | Path, project_id: int) -> str | None:
    """The published version (read the way a model store reads LIVE)."""
    live = ProjectPaths(Path(model_dir), project_id).models / "LIVE"
    try:
        return live.read_text().strip()
    except FileNotFoundError:
        return None


def _log(model_dir: str, project_id: int, *words: object) -> None:
    with open(runs_path(model_dir, project_id), "a") as out:
        out.write(" ".join(str(w) for w in words) + "\n")
        out.flush()
        os.fsync(out.fileno())


def _publish(model_dir: str, project_id: int, version: str, half_s: float) -> None:
    """Write versions/<version>/ whole under a temporary name, then swap LIVE (like model.bundle.publish)."""
    root = ProjectPaths(Path(model_dir), project_id).models
    tmp = root / "versions" / f".tmp-{version}"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "part1").write_text(version)
    time.sleep(half_s)  # a kill here must leave no half version behind
    (tmp / "manifest.json").write_text(json.dumps({"version": version}))
    os.replace(tmp, root / "versions" / version)
    (root / ".LIVE.tmp").write_text(version)
    os.replace(root / ".LIVE.tmp", root / "LIVE")


_warmed_at: float | None = None


def warm_up() -> None:
    """Called by the embedded scheduler's child before it waits for a job (like ``ml_backend.training.jobs.warm_up``)."""
    global _warmed_at
    _warmed_at = time.time()


def recording_job(project_id: int, model_dir: str, force_pretrain: bool = False) -> dict[str, Any]:
    """A job with train_project's signature and record keeping, steered by the control file."""
    settings = Settings.from_env(env={}, model_dir=model_dir)
    records = JobRecords(settings.project(project_id))
    try:
        from rq import get_current_job

        current = get_current_job()
    except Exception:
        current = None
    job_id = current.id if current is not None else f"test-{project_id}-{os.getpid()}"

    def work() -> dict[str, Any]:
        control = json.loads(control_path(model_dir, project_id).read_text()) if control_path(
            model_dir, project_id).exists() else {}
        _log(model_dir, project_id, "start", os.getpid(), time.time(), job_id, _warmed_at)
        if control.get("die_once") and not (Path(model_dir) / f"died-{project_id}").exists():
            (Path(model_dir) / f"died-{project_id}").write_text("x")
            time.sleep(float(control.get("sleep", 0)))
            os.kill(os.getpid(), signal.SIGKILL)
        if control.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        if control.get("fail"):
            raise RuntimeError(control["fail"])
        version = f"v{time.time_ns()}"
        _publish(model_dir, project_id, version, half_s=float(control.get("sleep", 0)))
        _log(model_dir, project_id, "end", os.getpid(), time.time(), job_id)
        return {"status": JobOutcome.SUCCEEDED.value, "version": version}

    return run_recorded(records, job_id, work)


# --------------------------------------------------------------------------------------------------------
# Job records
# --------------------------------------------------------------------------------------------------------


def test_records_start_empty_and_do_not_create_dirs(tmp_path: Path) -> None:
    records = JobRecords(ProjectPaths(tmp_path, 3))
    record = records.read()
    assert record["project_id"] == 3 and record["last_outcome"] is None and record["counts"]["started"] == 0
    assert not (ProjectPaths(tmp_path, 3).root).exists()


def test_run_recorded_success_skip_and_failure(tmp_path: Path) -> None:
    records = JobRecords(ProjectPaths(tmp_path, 1))
    out = run_recorded(records, "j1", lambda: {"version": "v1"})
    assert out["status"] == "succeeded" and out["duration_s"] >= 0
    r = records.read()
    assert r["last_success"]["version"] == "v1" and r["running_job_id"] is None and r["counts"]["succeeded"] == 1

    run_recorded(records, "j2", lambda: {"status": "skipped", "reason": "need 3 more labels"})
    r = records.read()
    assert r["last_outcome"] == "skipped" and r["last_skip"]["reason"] == "need 3 more labels"
    assert r["last_success"]["version"] == "v1"  # a skip keeps the last success

    def boom() -> dict[str, Any]:
        raise ValueError("bad label config: no Taxonomy tag")

    with pytest.raises(ValueError):
        run_recorded(records, "j3", boom)
    r = records.read()
    assert r["last_outcome"] == "failed" and "no Taxonomy tag" in r["last_failure"]["reason"]
    assert r["last_failure"]["job_id"] == "j3" and r["counts"] == {
        "scheduled": 0, "coalesced": 0, "started": 3, "succeeded": 1, "skipped": 1, "failed": 1}
    assert json.loads(records.path.read_text())["counts"]["failed"] == 1


def test_records_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    records = JobRecords(ProjectPaths(tmp_path, 1))

    def add() -> None:
        for _ in range(50):
            JobRecords(ProjectPaths(tmp_path, 1)).add_coalesced(1)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert records.read()["counts"]["coalesced"] == 200


# --------------------------------------------------------------------------------------------------------
# Embedded scheduler
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def embedded(tmp_path: Path):
    settings = Settings.from_env(env={}, model_dir=tmp_path)
    scheduler = make_scheduler(settings, job_func=JOB)
    try:
        yield scheduler
    finally:
        scheduler.close()


def test_make_scheduler_without_redis_is_embedded(embedded) -> None:
    assert embedded.kind == "embedded" and embedded.health()["ok"] is True


def test_burst_of_100_runs_at_most_twice_and_schedule_is_fast(embedded, tmp_path: Path) -> None:
    set_control(tmp_path, 5, sleep=0.5)
    times = []
    actions = []
    for _ in range(100):
        t0 = time.perf_counter()
        actions.append(embedded.schedule(5, "ANNOTATION_CREATED")["action"])
        times.append(time.perf_counter() - t0)
    assert embedded.wait_idle(60)
    runs = [r for r in read_runs(tmp_path, 5) if r[0] == "start"]
    assert 1 <= len(runs) <= 2, runs
    assert actions[0] == ScheduleAction.QUEUED.value
    assert actions.count(ScheduleAction.COALESCED.value) >= 98
    assert max(times) < 0.05 and sum(times) / len(times) < 0.001, (max(times), sum(times) / len(times))
    status = embedded.status(5)
    assert status["last_outcome"] == "succeeded" and status["queued"] is False and status["running"] is False
    assert status["counts"]["started"] == len(runs)
    assert status["counts"]["coalesced"] + status["counts"]["scheduled"] == 100
    assert live_version(tmp_path, 5) == status["last_success"]["version"]


def test_event_during_a_run_gets_exactly_one_follow_up(embedded, tmp_path: Path) -> None:
    set_control(tmp_path, 6, sleep=1.0)
    assert embedded.schedule(6, "ANNOTATION_CREATED")["action"] == "queued"
    deadline = time.monotonic() + 30
    while not read_runs(tmp_path, 6) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert embedded.status(6)["running"] is True
    actions = [embedded.schedule(6, "ANNOTATION_UPDATED")["action"] for _ in range(10)]
    assert actions[0] == ScheduleAction.FOLLOW_UP.value and set(actions[1:]) == {ScheduleAction.COALESCED.value}
    assert embedded.status(6)["queued"] is True
    assert embedded.wait_idle(60)
    runs = read_runs(tmp_path, 6)
    assert [r[0] for r in runs] == ["start", "end", "start", "end"]
    assert float(runs[2][2]) >= float(runs[1][2])  # the follow-up started after the first run ended
    assert embedded.status(6)["counts"]["succeeded"] == 2


def test_failure_is_recorded_with_its_reason_and_nothing_escapes(embedded, tmp_path: Path) -> None:
    set_control(tmp_path, 7, fail="Label Studio answered 401: set LABEL_STUDIO_API_KEY")
    out = embedded.schedule(7, "START_TRAINING")
    assert out["action"] == "queued"
    assert embedded.wait_idle(30)
    status = embedded.status(7)
    assert status["last_outcome"] == "failed"
    assert "answered 401: set LABEL_STUDIO_API_KEY" in status["last_failure"]["reason"]
    assert status["running_job_id"] is None and live_version(tmp_path, 7) is None
    # the scheduler is still healthy and the next run succeeds
    set_control(tmp_path, 7)
    embedded.schedule(7, "START_TRAINING")
    assert embedded.wait_idle(30)
    assert embedded.health()["ok"] and embedded.status(7)["last_outcome"] == "succeeded"


def test_a_warmed_up_fresh_process_waits_for_the_next_job(embedded, tmp_path: Path) -> None:
    set_control(tmp_path, 14)
    embedded.schedule(14, "ANNOTATION_CREATED")
    assert embedded.wait_idle(30)
    assert wait_until(lambda: embedded.health()["spare_ready"], 60)  # the spare child warms up while idle
    second_scheduled_at = time.time()
    embedded.schedule(14, "ANNOTATION_CREATED")
    assert embedded.wait_idle(30)
    first, second = [r for r in read_runs(tmp_path, 14) if r[0] == "start"]
    assert first[1] != second[1]  # every job in its own process
    assert float(second[4]) < second_scheduled_at  # warmed up before the job arrived
    assert float(first[4]) <= float(first[2])  # the first job's child warmed up, then ran it


def test_child_killed_mid_job_is_recorded_and_server_survives(embedded, tmp_path: Path) -> None:
    set_control(tmp_path, 8, die=True)
    embedded.schedule(8, "ANNOTATION_CREATED")
    assert embedded.wait_idle(30)
    status = embedded.status(8)
    assert status["last_outcome"] == "failed" and "training process died" in status["last_failure"]["reason"]
    assert status["running_job_id"] is None
    assert embedded.health()["ok"]


def test_unknown_job_function_is_recorded(tmp_path: Path) -> None:
    scheduler = make_scheduler(Settings.from_env(env={}, model_dir=tmp_path), job_func="tests.nowhere.job")
    try:
        scheduler.schedule(9, "train")
        assert scheduler.wait_idle(30)
        assert "cannot import job" in scheduler.status(9)["last_failure"]["reason"]
    finally:
        scheduler.close()


def test_projects_do_not_block_each_others_queue_entry(embedded, tmp_path: Path) -> None:
    for pid in (11, 12, 13):
        set_control(tmp_path, pid)
        assert embedded.schedule(pid, "ANNOTATION_CREATED")["action"] == "queued"
    assert embedded.wait_idle(60)
    assert all(embedded.status(pid)["last_outcome"] == "succeeded" for pid in (11, 12, 13))


def test_run_left_running_by_a_stopped_server_is_closed_as_interrupted(embedded, tmp_path: Path) -> None:
    settings = Settings.from_env(env={}, model_dir=tmp_path)
    JobRecords(settings.project(14)).mark_started("embedded-14-1")  # the server died mid-run
    before = embedded.status(14)
    assert before["running"] is False and before["running_since"] is None and before["running_job_id"] is None
    set_control(tmp_path, 14)
    embedded.schedule(14, "ANNOTATION_CREATED")
    assert embedded.wait_idle(30)
    status = embedded.status(14)
    assert status["last_outcome"] == "succeeded" and status["counts"]["failed"] == 1
    assert status["last_failure"]["reason"].startswith("interrupted") and status["last_failure"]["job_id"] == "embedded-14-1"


def test_a_spare_whose_scheduler_is_gone_before_it_is_ready_exits_quietly(tmp_path: Path) -> None:
    """The server stopped while a spare training process was still warming up: the spare's "ready" meets a closed
    pipe; it exits cleanly (exit code 0, no traceback) instead of dying on BrokenPipeError."""
    import multiprocessing

    from ml_backend.queue.child import child_main

    parent, child = multiprocessing.Pipe()
    parent.close()  # the scheduler is gone
    process = multiprocessing.get_context("spawn").Process(
        target=child_main, args=(child, JOB, Settings(model_dir=tmp_path)), name="taxomoco-train")
    process.start()
    child.close()
    process.join(120)
    assert process.exitcode == 0
