"""The embedded scheduler: training inside the server's machine without Redis.

One background thread per server process takes projects from an in-memory line, one job at a time, and runs each job
in a fresh child process, so training never holds the server's GIL, its memory (GPU memory included) is returned when
the job ends, and a crash of the job cannot take the server down. ``schedule`` touches in-memory state under a lock
(microseconds), and writes the project's job record only when it puts the project in the line (at most twice per burst
of events: see Coalescing).

Warm start: children (:mod:`ml_backend.queue.child`) are forked from ``multiprocessing``'s fork server, which imports
what jobs need once (the job's module: torch, the model code; the Label Studio SDK: seconds of CPU,
:data:`ml_backend.queue.child.PRELOAD`), so a child starts in milliseconds and exits without tearing the interpreter
down. (With ``spawn`` each child imported everything again: 12-15 s per job on a loaded 2-core machine, then seconds
to exit, between every two jobs of a labeling stream; ``bench/results/retrain_latency.txt``.) The fork server and a
first child start with the scheduler; when a job is handed to a child, the next child is started and warms up (its
Label Studio client) while the job runs, so the next job starts at once.

Coalescing: a project is in the line at most once. An event for a project that waits is folded into it; an event for
the project that runs puts it in the line again, so exactly one follow-up run happens after the current one (the
follow-up pulls all annotations from Label Studio, this event's included). The follow-up is written to the job record
at once (``queued_since``), so the running job knows that its version will be superseded within seconds and leaves its
after-publish work to the follow-up (``ml_backend.training.tail``).

The line lives in memory: a server restart forgets waiting jobs. Label Studio is the source of truth, so
the next annotation (or the Train button) trains on everything.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ml_backend.queue.base import DEFAULT_JOB_FUNC, ScheduleAction, Scheduler
from ml_backend.queue.child import PRELOAD, TrainingChild, child_main
from ml_backend.settings import Settings
from ml_backend.training.policy import request_pretrain
from ml_backend.training.records import JobOutcome, JobRecords, utc_now

__all__ = ["EmbeddedScheduler"]

log = logging.getLogger(__name__)

_POLL_S = 0.2


@dataclass
class _Waiting:
    """A project in the line: when it entered, why, and how many later events were folded into it."""

    since: str
    reason: str
    force_pretrain: bool
    coalesced: int = 0


class EmbeddedScheduler(Scheduler):
    """Runs training jobs in child processes driven by one background thread of this process.

    Args:
        settings: process settings (``model_dir`` is passed to the job).
        job_func: dotted path of the job (signature of :func:`ml_backend.training.jobs.train_project`); the job
            records its own start and outcome in the project's job record (``job_records.run_recorded``).
    """

    kind = "embedded"

    def __init__(self, settings: Settings, job_func: str = DEFAULT_JOB_FUNC) -> None:
        self.settings = settings
        self.job_func = job_func
        self._cond = threading.Condition()
        self._line: OrderedDict[int, _Waiting] = OrderedDict()
        self._running: int | None = None
        self._running_since: str | None = None
        self._child: multiprocessing.process.BaseProcess | None = None
        self._spare: TrainingChild | None = None  # a warmed-up child waiting for the next job
        self._stopping = False
        self._runs = 0
        self._ctx = multiprocessing.get_context("forkserver")
        # applies when this process starts its fork server (the first child); a module that does not import is
        # skipped by the fork server, and the child then imports the job itself (recorded if it fails)
        self._ctx.set_forkserver_preload([job_func.rpartition(".")[0], *PRELOAD])
        self._thread = threading.Thread(target=self._loop, name="taxomoco-embedded-trainer", daemon=True)
        self._thread.start()

    # --- the caller's side (fast, in-memory only) ----------------------------------------------------
    def schedule(self, project_id: int, reason: str, force_pretrain: bool = False) -> dict[str, Any]:
        pid = int(project_id)
        if force_pretrain:
            try:
                request_pretrain(self.settings.project(pid))  # kept until a pretraining is published
            except OSError as exc:
                log.warning("Project %s: pretraining request not written (%s).", pid, exc)
        with self._cond:
            waiting = self._line.get(pid)
            if waiting is not None:
                waiting.coalesced += 1
                waiting.force_pretrain = waiting.force_pretrain or force_pretrain
                action = ScheduleAction.COALESCED
            elif len(self._line) >= self.settings.train_queue_max_projects:
                action = ScheduleAction.DROPPED
            else:
                self._line[pid] = _Waiting(since=utc_now(), reason=reason, force_pretrain=force_pretrain)
                action = ScheduleAction.FOLLOW_UP if self._running == pid else ScheduleAction.QUEUED
                self._cond.notify()
        if action in (ScheduleAction.QUEUED, ScheduleAction.FOLLOW_UP):
            try:  # the running job reads it (ml_backend.training.tail); /job_status shows it
                JobRecords(self.settings.project(pid)).mark_queued(reason)
            except OSError as exc:
                log.warning("Project %s: job record not written (%s).", pid, exc)
        return {"project_id": pid, "scheduler": self.kind, "action": action.value, "reason": reason}

    def status(self, project_id: int) -> dict[str, Any]:
        pid = int(project_id)
        record = JobRecords(self.settings.project(pid)).read()
        with self._cond:
            waiting = self._line.get(pid)
            running = self._running == pid
            running_since = self._running_since
        record.update(scheduler=self.kind, queued=waiting is not None, running=running)
        if waiting is not None:
            record["queued_since"] = waiting.since
            record["queued_reason"] = waiting.reason
        if running and record.get("running_since") is None:
            record["running_since"] = running_since
        if not running:  # only this process runs the project's jobs: a recorded run without it is over
            record["running_since"] = record["running_job_id"] = None
        return record

    def health(self) -> dict[str, Any]:
        with self._cond:
            return {
                "scheduler": self.kind,
                "ok": self._thread.is_alive() and not self._stopping,
                "waiting_projects": len(self._line),
                "running_project": self._running,
                "runs": self._runs,
                "spare_ready": self._spare is not None and self._spare.poll_ready(),
            }

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread; a running training child is terminated (its partial work is never published)."""
        with self._cond:
            self._stopping = True
            child = self._child
            spare, self._spare = self._spare, None
            self._cond.notify_all()
        if child is not None and child.is_alive():
            child.terminate()
        if spare is not None:
            spare.conn.close()  # a waiting child exits when its pipe closes
            spare.process.join(1.0)
            if spare.process.is_alive():
                spare.process.terminate()
        self._thread.join(timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing waits or runs (for tests and benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._line or self._running is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, _POLL_S))
        return True

    # --- the background thread ------------------------------------------------------------------------
    def _loop(self) -> None:
        self._replenish()  # the fork server and a first child warm up while nothing waits
        while True:
            with self._cond:
                while not self._line and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                pid, waiting = self._line.popitem(last=False)
                self._running = pid
                self._running_since = utc_now()
                self._runs += 1
                n = self._runs
            try:
                self._run_one(pid, waiting, job_id=f"embedded-{pid}-{n}")
            except Exception:  # the thread must survive anything a run does; the failure is recorded
                log.exception("Embedded training of project %s failed outside the job.", pid)
            finally:
                with self._cond:
                    self._running = None
                    self._running_since = None
                    self._child = None
                    self._cond.notify_all()

    def _start_child(self) -> TrainingChild:
        """Start a training process that warms up and waits for one job."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=child_main, args=(child_conn, self.job_func, self.settings),
                                    name="taxomoco-train", daemon=True)
        process.start()
        child_conn.close()
        return TrainingChild(process, parent_conn)

    def _take_spare(self) -> TrainingChild | None:
        """The warmed-up child, if one waits and is alive (call with ``self._cond`` held)."""
        spare, self._spare = self._spare, None
        if spare is not None and not spare.process.is_alive():
            spare.conn.close()
            return None
        return spare

    def _run_one(self, pid: int, waiting: _Waiting, job_id: str) -> None:
        records = JobRecords(self.settings.project(pid))
        stale = records.read()["running_job_id"]
        if stale is not None:  # only this thread runs this project's jobs: that run ended with its server
            records.mark_finished(JobOutcome.FAILED, 0.0, stale, reason="interrupted: the server stopped during the run")
        records.add_coalesced(waiting.coalesced)  # the run was recorded as queued when it entered the line
        start = time.monotonic()
        with self._cond:
            if self._stopping:
                return
            spawned = self._take_spare()
        if spawned is None:  # outside the lock: the first start of the fork server imports PRELOAD (seconds)
            spawned = self._start_child()
        with self._cond:
            if self._stopping:
                spawned.conn.close()  # a waiting child exits when its pipe closes
                return
            self._child = child = spawned.process
        parent_conn = spawned.conn
        try:
            parent_conn.send((pid, str(self.settings.model_dir), waiting.force_pretrain))
        except OSError:  # the child died while waiting: noticed below as a death without an answer
            pass
        log.info("Training project %s in child process %s (%s).", pid, child.pid, waiting.reason)
        self._replenish()  # the next child warms up (the SDK's client: 1-2 CPU-s under load) while this one trains
        message = None
        follow_up_shown = False
        while message is None:
            if not follow_up_shown:
                follow_up_shown = self._show_follow_up(pid, records)
            if parent_conn.poll(_POLL_S):
                try:
                    message = parent_conn.recv()
                except EOFError:
                    break
                if message[0] == "ready":  # warm-up done; the outcome comes next
                    message = None
            elif not child.is_alive():
                if parent_conn.poll(0):
                    continue
                break
        child.join()
        parent_conn.close()
        if message is None or message[0] == "unrecorded-error":
            reason = (
                message[1]
                if message is not None
                else f"training process died with exit code {child.exitcode} (killed, out of memory, or crashed)"
            )
            log.error("Project %s: %s.", pid, reason)
            records.mark_finished(JobOutcome.FAILED, time.monotonic() - start, None, reason=reason)
        elif message[0] == "error":
            log.error("Project %s: training failed: %s", pid, message[1])
        else:
            log.info("Project %s: training finished: %s", pid, message[1])
        self._replenish()

    def _show_follow_up(self, pid: int, records: JobRecords) -> bool:
        """Keep a waiting follow-up of the running project in its job record, where the job looks for it
        (``ml_backend.training.tail``); True once it is there for good.

        ``schedule`` wrote it when the event arrived, but the job clears ``queued_since`` when it starts
        (``JobRecords.mark_started``), so an event between handing out the job and its start would be lost to it.
        """
        with self._cond:
            waiting = self._line.get(pid)
        if waiting is None:
            return False
        record = records.read()
        if record["running_job_id"] is None:  # the job has not started: its start would clear what is written now
            return False
        if record["queued_since"] is None:
            records.mark_waiting(waiting.reason)
        return True

    def _replenish(self) -> None:
        """Start a spare child that warms up while the line is idle, so that the next job starts at once."""
        with self._cond:
            if self._stopping or self._spare is not None:
                return
        spare: TrainingChild | None = self._start_child()
        with self._cond:
            if not self._stopping and self._spare is None:
                self._spare, spare = spare, None
        if spare is not None:  # closed (or replenished) meanwhile
            spare.conn.close()
            spare.process.join(1.0)

