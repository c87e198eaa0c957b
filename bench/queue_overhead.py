"""Queue overhead of the training schedulers, through the real HTTP server on loopback.

For each scheduler (embedded: no REDIS_URL; RQ: a private redis-server + one ``taxomoco worker``), the
backend runs as ``taxomoco serve`` does (waitress, 8 threads) with a tiny job function
that only records when it started (plus the job record writes every job does) and sleeps a little:

1. latency: one ``POST /webhook`` for an idle project, then the time until the job function starts
   (sequential trials, fresh project each);
2. absorption: 8 client threads post webhooks as fast as they can for a few seconds, spread over 20
   projects; reported: webhooks/s, answer-time percentiles, share answered within 1 s, and how many runs
   the events turned into (coalescing).

Run: ``.venv/bin/python bench/queue_overhead.py [--trials 10] [--seconds 5]``; writes
``bench/results/queue_overhead.txt``. The machine's cores are shared, so absolute figures are noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent
JOB = "queue_overhead.marker_job"


# --------------------------------------------------------------------------------------------------------
# The job (imported as ``queue_overhead`` by the server's training children and the RQ work-horses)
# --------------------------------------------------------------------------------------------------------


def marker_job(project_id: int, model_dir: str, force_pretrain: bool = False) -> dict[str, Any]:
    """Record the start time, keep the job record like train_project does, sleep ``job_sleep`` seconds."""
    started = time.time()
    with open(Path(model_dir) / "starts.log", "a") as out:
        out.write(f"{project_id} {started}\n")
    from ml_backend.paths import ProjectPaths
    from ml_backend.training.records import JobRecords, run_recorded

    sleep_s = float((Path(model_dir) / "job_sleep").read_text()) if (Path(model_dir) / "job_sleep").exists() else 0.0
    records = JobRecords(ProjectPaths(Path(model_dir), int(project_id)))
    return run_recorded(records, f"bench-{project_id}-{os.getpid()}",
                        lambda: (time.sleep(sleep_s), {"status": "succeeded", "version": "v"})[1])


# --------------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except Exception:  # not up yet
            pass
        time.sleep(0.1)
    return False


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MODEL_DIR")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "bench"), str(REPO), env.get("PYTHONPATH", "")])
    env["LOG_LEVEL"] = "WARNING"
    return env


def start_server(model_dir: Path, port: int, redis_url: str | None, log: Path) -> subprocess.Popen:
    code = (
        "from ml_backend.settings import Settings\n"
        "from ml_backend.http.server import serve\n"
        "from ml_backend.http.app import create_app\n"
        "from ml_backend.queue.factory import make_scheduler\n"
        f"s = Settings.from_env(model_dir={str(model_dir)!r}, port={port}, host='127.0.0.1', "
        f"redis_url={redis_url!r}, http_threads=8)\n"
        f"serve(s, app_factory=lambda st: create_app(st, scheduler=make_scheduler(st, job_func={JOB!r})))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=child_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def start_worker(model_dir: Path, redis_url: str, log: Path) -> subprocess.Popen:
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING)\n"
        "from ml_backend.settings import Settings\n"
        "from ml_backend.queue.worker import run_worker\n"
        f"run_worker(Settings.from_env(model_dir={str(model_dir)!r}, redis_url={redis_url!r}, log_level='WARNING'))\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=child_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def read_starts(model_dir: Path) -> list[tuple[int, float]]:
    try:
        lines = (model_dir / "starts.log").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(int(a), float(b)) for a, b in (line.split() for line in lines)]


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------


def webhook(session: requests.Session, url: str, pid: int) -> float:
    """POST one ANNOTATION_CREATED webhook; returns the answer time in seconds."""
    body = {"action": "ANNOTATION_CREATED", "project": {"id": pid}, "annotation": {"id": 1}, "task": {"id": 1}}
    t0 = time.perf_counter()
    answer = session.post(f"{url}/webhook", json=body, timeout=10)
    took = time.perf_counter() - t0
    answer.raise_for_status()
    return took


def latency_trials(url: str, model_dir: Path, trials: int) -> list[float]:
    """Seconds from sending a webhook to the job's start, one idle project at a time."""
    out = []
    with requests.Session() as session:
        for i in range(trials):
            pid = 1000 + i
            sent = time.time()
            webhook(session, url, pid)
            if not wait_for(lambda pid=pid: any(p == pid for p, _ in read_starts(model_dir)), 60):
                raise RuntimeError(f"job of project {pid} never started")
            started = next(t for p, t in read_starts(model_dir) if p == pid)
            out.append(started - sent)
            time.sleep(0.3)
    return out


def absorption(url: str, seconds: float, clients: int = 8, projects: int = 20) -> dict[str, Any]:
    """Post webhooks from ``clients`` threads for ``seconds``; answer times and counts."""
    times: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int) -> None:
        n = 0
        with requests.Session() as session:
            while time.perf_counter() < stop_at:
                try:
                    took = webhook(session, url, 1 + (k * 7 + n) % projects)
                except requests.RequestException:
                    with lock:
                        errors[0] += 1
                    continue
                n += 1
                with lock:
                    times.append(took)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    times.sort()
    return {
        "events": len(times),
        "errors": errors[0],
        "per_s": len(times) / wall,
        "p50_ms": 1000 * times[len(times) // 2],
        "p99_ms": 1000 * times[int(len(times) * 0.99)],
        "max_ms": 1000 * times[-1],
        "under_1s": sum(t < 1.0 for t in times) / len(times),
    }


def run_one(kind: str, trials: int, seconds: float, workdir: Path) -> dict[str, Any]:
    model_dir = workdir / kind / "data"
    model_dir.mkdir(parents=True)
    redis_proc = worker = server = None
    redis_url = None
    try:
        if kind == "rq":
            rport = free_port()
            redis_proc = subprocess.Popen(
                [shutil.which("redis-server") or "redis-server", "--port", str(rport), "--bind", "127.0.0.1",
                 "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
            redis_url = f"redis://127.0.0.1:{rport}/0"
            import redis

            assert wait_for(lambda: redis.Redis.from_url(redis_url).ping(), 10), "redis-server did not start"
            worker = start_worker(model_dir, redis_url, workdir / kind / "worker.log")
        port = free_port()
        server = start_server(model_dir, port, redis_url, workdir / kind / "server.log")
        url = f"http://127.0.0.1:{port}"
        assert wait_for(lambda: requests.get(f"{url}/health", timeout=2).ok, 120), \
            (workdir / kind / "server.log").read_text()[-2000:]
        if worker is not None:
            assert wait_for(lambda: requests.get(f"{url}/health", timeout=3).json()["scheduler"].get("workers", 0) >= 1,
                            120), (workdir / kind / "worker.log").read_text()[-2000:]
        webhook(requests.Session(), url, 999)  # warm the server's code paths
        time.sleep(2.0)
        lat = latency_trials(url, model_dir, trials)
        (model_dir / "job_sleep").write_text("0.5")
        before = len(read_starts(model_dir))
        absorb = absorption(url, seconds)
        def idle() -> bool:
            for pid in range(1, 21):
                state = requests.post(f"{url}/job_status", json={"project": pid}, timeout=5).json()
                if state.get("queued") or state.get("running"):
                    return False
            return True

        assert wait_for(idle, 300), "jobs did not drain"
        time.sleep(1.0)
        runs = len(read_starts(model_dir)) - before
        return {"kind": kind, "lat": lat, "absorb": absorb, "runs": runs}
    finally:
        stop(server)
        stop(worker)
        stop(redis_proc)


def schedule_calls(workdir: Path, calls: int = 2000) -> list[tuple[str, float, float, float]]:
    """In-process ``Scheduler.schedule`` cost (no HTTP): a burst of ``calls`` events for one project, i.e.
    after the first one or two calls the coalescing path every burst takes; µs p50/p99/max. Embedded: the
    first event's job runs (sleeping), the second queues the follow-up; RQ: no worker, the first queues."""
    import redis

    from ml_backend.queue.factory import make_scheduler
    from ml_backend.settings import Settings

    out = []
    rport = free_port()
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(rport), "--bind",
                             "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"redis://127.0.0.1:{rport}/0"
        assert wait_for(lambda: redis.Redis.from_url(url).ping(), 10)
        for kind, redis_url in (("embedded", None), ("rq", url)):
            settings = Settings.from_env(env={}, model_dir=workdir / f"calls-{kind}", redis_url=redis_url)
            settings.model_dir.mkdir(parents=True)
            (settings.model_dir / "job_sleep").write_text("60")  # the first run stays busy (embedded)
            scheduler = make_scheduler(settings, job_func=JOB)
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                scheduler.schedule(1, "ANNOTATION_CREATED")
                times.append(time.perf_counter() - t0)
            scheduler.close()
            times.sort()
            out.append((kind, 1e6 * times[len(times) // 2], 1e6 * times[int(len(times) * 0.99)], 1e6 * times[-1]))
    finally:
        stop(proc)
    return out


def table(results: list[dict[str, Any]], trials: int, seconds: float) -> str:
    rows = [
        f"Queue overhead on loopback ({os.cpu_count()} shared CPU cores; waitress, 8 threads; "
        f"{trials} latency trials; absorption: 8 client threads for {seconds:.0f} s over 20 projects, "
        "job = record + sleep 0.5 s)",
        "",
        "| scheduler | webhook → job start p50 (ms) | max (ms) | webhooks/s absorbed | answer p50 (ms) | "
        "answer p99 (ms) | answer max (ms) | answered < 1 s | webhooks → job runs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["absorb"]
        name = {"embedded": "embedded (thread + spawned child)", "rq": "RQ (redis-server + 1 forking worker)"}[r["kind"]]
        rows.append(
            f"| {name} | {1000 * statistics.median(r['lat']):.0f} | {1000 * max(r['lat']):.0f} | {a['per_s']:.0f} | "
            f"{a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {a['max_ms']:.1f} | {100 * a['under_1s']:.1f}% | "
            f"{a['events']} → {r['runs']} |"
        )
    return "\n".join(rows) + "\n"


def calls_table(calls: list[tuple[str, float, float, float]], n: int) -> str:
    rows = [f"In-process Scheduler.schedule() during a burst ({n} events, one project, its job waiting):", "",
            "| scheduler | p50 (µs) | p99 (µs) | max (µs) |", "|---|---|---|---|"]
    rows += [f"| {kind} | {p50:.0f} | {p99:.0f} | {mx:.0f} |" for kind, p50, p99, mx in calls]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "queue_overhead.txt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="taxomoco-queue-bench-") as tmp:
        calls = schedule_calls(Path(tmp))
        results = [run_one(kind, args.trials, args.seconds, Path(tmp)) for kind in ("embedded", "rq")]
    text = table(results, args.trials, args.seconds) + "\n" + calls_table(calls, 2000)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
