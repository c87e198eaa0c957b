"""Scale curve: one real Label Studio project (SQLite or PostgreSQL) driven through 1k, 10k and 100k tasks, stage by stage.

For each size N, in a fresh child process (so that peak memory is that size's alone) and a fresh Label Studio 1.23
(``tests/servers.py``, images served from a local-files storage) on a fresh database: SQLite (Label Studio's
default) or, with ``--database postgresql``, a throwaway PostgreSQL cluster (``tests.servers.PostgresServer``:
``initdb`` in a temporary directory, its own port on 127.0.0.1; as root the cluster runs as the ``postgres`` user,
because PostgreSQL refuses to run as root):

1. ``import``: N image tasks (``--unique`` distinct animal-mnist PNGs, repeated; half the tasks with one
   annotation, one labelled task in ten with a second, sometimes different, annotation) through
   ``POST /api/projects/<id>/import`` in JSON batches of ``--batch``;
2. ``full pull``: ``ml_backend.training.pull.pull_project`` with no local copy (every task and annotation);
3. ``incremental pull``: the same after 10 tasks got a new annotation through Label Studio's API (the import
   ended more than ``snapshot.OVERLAP_S`` before the full pull, so only changed tasks are read again);
4. ``train_project`` (the training job, in process, its public entry point) with its own steps timed from the
   job's step log (``pull`` .. ``disagreements``): ``labels`` is consensus, ``images`` the image sync from Label
   Studio, ``embed`` the features of every candidate through the embedding cache, ``fit`` the model choice
   (cross-validated candidates) and heads; then ``prelabel``: the bulk prediction write into Label Studio
   (``ml_backend.prelabel``, inline after the job as in the embedded scheduler);
5. ``/predict warm``: ``taxomoco serve`` on the same model directory; ``--predict-tasks`` tasks once to warm its
   caches, then the same tasks again in batches of ``--predict-batch``, timed per request.

Time is wall clock; peak memory is the benchmark process's peak RSS during the stage (``VmHWM`` after resetting
it through ``/proc/self/clear_refs``), Label Studio's own RSS is printed after each size. The growth exponent of a
stage is the log-log slope of its time between consecutive sizes (1 = linear).

Settings: the product's defaults except ``PRETRAIN_MIN_IMAGES`` (raised so that no MoCo pretraining runs: it is
capped by ``PRETRAIN_MAX_MINUTES`` whatever N, and measured by ``bench/pretrain_throughput.py``), printed in the
result. Torch runs on one thread (``--threads``).

Usage: ``nice .venv/bin/python bench/scale.py [--sizes 1000 10000 100000] [--unique 10000] [--database postgresql]
[--ls-env NAME=VALUE ...] [--out bench/results/scale.txt]`` (needs Label Studio in ``.ls-venv``: ``make label-studio``;
``pip install --no-deps animal-mnist==0.4``; for PostgreSQL, Debian's ``postgresql`` package and psycopg in Label
Studio's venv: ``.ls-venv/bin/pip install 'psycopg[binary]'``).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import math
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

from bench.datasets import animal_label_config, load_animal_mnist, png_bytes, taxonomy_result  # noqa: E402
from bench.provenance import header, load_line, write_result  # noqa: E402
from ml_backend.labelstudio import snapshot  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from ml_backend.training import jobs, records  # noqa: E402
from ml_backend.training.jobs import train_project  # noqa: E402
from ml_backend.training.pull import pull_project  # noqa: E402
from tests.servers import (  # noqa: E402
    LabelStudioServer,
    PostgresServer,
    free_port,
    label_studio_binary,
    stop_process,
    wait_until,
)

CHANGED_SETTINGS = {"PRETRAIN_MIN_IMAGES": "1000000000"}
"""Public settings this benchmark changes from the defaults (printed in the result)."""
STAGES = ("import", "full pull", "incremental pull", "job: pull", "job: labels (consensus)", "job: images",
          "job: encoder", "job: embed", "job: fit (model choice + heads)", "job: neighbors", "job: publish",
          "job: cross_validation", "job: disagreements", "prelabel (bulk prediction write)", "/predict warm")
STEP_LOGGER = records.__name__
"""The logger of the job's ``step X ...`` / ``step X done`` lines."""
JOB_STEP_NAMES = {"labels": "job: labels (consensus)", "fit": "job: fit (model choice + heads)"}


# ---- memory ----------------------------------------------------------------------------------------------
def _status_kib(field: str, pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> None:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5: VmHWM := VmRSS)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mib() -> float:
    return _status_kib("VmHWM") / 1024


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(roots: list[int]) -> float:
    """CPU seconds (user + system) of the processes ``roots`` and all their descendants, their reaped children
    included (``/proc/<pid>/stat`` utime, stime, cutime, cstime): a server's work, PostgreSQL's backends too."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(entry)] = int(fields[1])  # fields[0] is the state; then ppid ... utime is field 14 of stat
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])
    total, wanted = 0, set(roots)
    for pid in ticks:
        p = pid
        while p > 1 and p not in wanted:
            p = parent.get(p, 0)
        if p in wanted:
            total += ticks[pid]
    return total / _TICK


class Stages:
    """Wall time, peak RSS and CPU seconds (this process; the servers in ``servers``) per stage."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.servers: list[int] = []  # Label Studio's and PostgreSQL's process ids
        self._t0 = 0.0
        self._cpu0 = (0.0, 0.0)

    def _cpu(self) -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, tree_cpu_s(self.servers)

    def start(self) -> None:
        reset_peak()
        self._cpu0 = self._cpu()
        self._t0 = time.perf_counter()

    def stop(self, name: str, **extra: float) -> None:
        took = time.perf_counter() - self._t0
        ours, servers = self._cpu()
        self.rows[name] = {"s": took, "peak_mib": peak_mib(), "cpu_s": ours - self._cpu0[0],
                           "server_cpu_s": servers - self._cpu0[1], **extra}
        row = self.rows[name]
        print(f"  {name}: {took:.2f} s, peak {row['peak_mib']:.0f} MiB, CPU {row['cpu_s']:.1f} s ours + "
              f"{row['server_cpu_s']:.1f} s servers {extra or ''}", flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.start()
        yield
        self.stop(name)


class JobSteps(logging.Handler):
    """Times the training job's steps from its ``step X ...`` / ``step X done`` log lines
    (``ml_backend.training.records.timed_step``)."""

    def __init__(self, stages: Stages) -> None:
        super().__init__(logging.INFO)
        self.stages = stages

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != STEP_LOGGER or not record.msg.startswith("step "):
            return
        step = record.args[0]
        if record.msg == "step %s ...":
            self.stages.start()
        elif record.msg.startswith("step %s done"):
            self.stages.stop(JOB_STEP_NAMES.get(step, f"job: {step}"))
            self.stages.start()  # what follows the last step is the pre-annotation


# ---- the project -------------------------------------------------------------------------------------------
def one_size(n: int, unique: int, batch: int, predict_tasks: int, predict_batch: int, work: Path) -> dict:
    """Every stage for ``n`` tasks; returns ``{"rows": {stage: {...}}, "ls_rss_mib": ..., "notes": [...]}``."""
    torch.set_num_threads(THREADS)
    postgres = PostgresServer() if DATABASE == "postgresql" else None
    if postgres is not None:
        postgres.start()
    ls_env = {**(postgres.label_studio_env() if postgres else {}), **LS_ENV}  # LS_ENV: --ls-env
    ls = LabelStudioServer(work / "ls", label_studio_binary(), env=ls_env)
    model_dir = work / "models"
    try:
        ls.start(timeout_s=1200)  # PostgreSQL: the first start migrates an empty database (1-3 min here)
    except BaseException:
        if postgres is not None:
            postgres.stop()
        raise
    os.environ.update({"MODEL_DIR": str(model_dir), "LABEL_STUDIO_URL": ls.url,
                       "LABEL_STUDIO_API_KEY": ls.admin.token, **CHANGED_SETTINGS})
    # Settings.from_env (here and in the job) reads the environment set above
    notes: list[str] = []
    stages = Stages()
    notes.append(load_line("as this size started"))
    stages.servers = [p.pid for p in (ls.proc, postgres.proc if postgres else None) if p is not None]
    backend = None
    try:
        config = animal_label_config()
        pid = ls.create_project(config, title=f"scale {n}")
        folder = ls.files_root / "animal"
        folder.mkdir(parents=True, exist_ok=True)
        ls.api("POST", "/api/storages/localfiles", json={"project": pid, "path": str(folder), "title": "animal",
                                                         "use_blob_urls": False})
        images, paths = load_animal_mnist()
        rng = np.random.default_rng(0)
        picks = rng.permutation(len(images))[:unique]
        for i in picks:
            (folder / f"{int(i):05d}.png").write_bytes(png_bytes(images[i]))
        leaves = sorted({tuple(p) for p in paths})
        tasks = []
        for k in range(n):
            i = int(picks[k % unique])
            task: dict = {"data": {"image": f"/data/local-files/?d=animal/{i:05d}.png"}}
            if k % 2 == 0:
                anns = [{"result": taxonomy_result(tuple(paths[i])), "completed_by": ls.admin.id}]
                if k % 20 == 0:  # one labelled task in ten: a second annotation, one in three of them different
                    other = tuple(paths[i]) if k % 60 else leaves[(leaves.index(tuple(paths[i])) + 1) % len(leaves)]
                    anns.append({"result": taxonomy_result(other), "completed_by": ls.admin.id})
                task["annotations"] = anns
            tasks.append(task)
        print(f"N={n}: importing ...", flush=True)
        task_ids: list[int] = []
        with stages.stage("import"):
            for b in range(0, n, batch):
                task_ids += ls.import_tasks(pid, tasks[b:b + batch])
        assert len(task_ids) == n, (len(task_ids), n)

        time.sleep(snapshot.OVERLAP_S + 1)  # else the incremental pull re-reads the just-imported tasks (overlap)
        settings = Settings.from_env(model_dir=str(model_dir))
        ppaths = settings.project(pid)
        with stages.stage("full pull"):
            source = pull_project(settings, ppaths)
        source.client.close()
        assert source.pull["kind"] == "full" and len(source.tasks) == n, source.pull
        time.sleep(1.0)
        for t in task_ids[1:20:2]:  # 10 unlabelled tasks get an annotation
            ls.annotate(t, taxonomy_result(leaves[0]))
        with stages.stage("incremental pull"):
            source = pull_project(settings, ppaths)
        source.client.close()
        notes.append(f"incremental pull: {source.pull['kind']}, {source.pull['read']} tasks read")
        assert source.pull["kind"] == "incremental", source.pull

        handler = JobSteps(stages)
        logging.getLogger(STEP_LOGGER).addHandler(handler)
        logging.getLogger(STEP_LOGGER).setLevel(logging.INFO)
        print(f"N={n}: training job ...", flush=True)
        if PROFILE:  # the bulk prediction write under cProfile (its time is then not comparable)
            plain = jobs.after_publish

            def profiled(*a, **k):
                prof = cProfile.Profile()
                try:
                    return prof.runcall(plain, *a, **k)
                finally:
                    pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(40)

            jobs.after_publish = profiled
        stages.start()
        result = train_project(pid, str(model_dir))
        stages.stop("prelabel (bulk prediction write)")
        logging.getLogger(STEP_LOGGER).removeHandler(handler)
        assert result["status"] == "succeeded", result
        notes.append(f"job counts: {json.dumps(result['counts'])}")
        notes.append(f"model choice: {json.dumps(result.get('model_choice'))[:300]}")
        project = ls.api("GET", f"/api/projects/{pid}").json()
        notes.append(f"Label Studio after the job: {project.get('total_predictions_number')} predictions, "
                     f"{project.get('total_annotations_number')} annotations, model_version "
                     f"{project.get('model_version')!r}")

        # /predict on a warm cache: taxomoco serve on the same model directory
        port = free_port()
        env = {k: v for k, v in os.environ.items()}
        env.update({"TAXOMOCO_HOST": "127.0.0.1", "TAXOMOCO_PORT": str(port), "PYTHONPATH": str(ROOT),
                    "OMP_NUM_THREADS": str(THREADS)})
        log_path = work / "taxomoco.log"
        with open(log_path, "ab") as logf:
            backend = subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "serve"], env=env, cwd=ROOT,
                                       stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return requests.get(f"{base}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        assert wait_until(up, 120, 0.5), log_path.read_text()[-3000:]
        # what Label Studio sends when the model is connected: /predict serves only projects verified this way
        requests.post(f"{base}/setup", json={"project": f"{pid}.1700000000", "schema": config, "hostname": ls.url,
                                             "access_token": ls.admin.token, "model_version": ""},
                      timeout=60).raise_for_status()
        sample = [int(t) for t in rng.choice(task_ids, size=min(predict_tasks, n), replace=False)]
        by_id = {t: tasks[task_ids.index(t)] for t in sample}

        def predict(ids: list[int], loading_ok: bool = False) -> float:
            body = {"tasks": [{"id": t, "data": by_id[t]["data"]} for t in ids], "project": f"{pid}.1700000000",
                    "label_config": config, "params": {}}
            t0 = time.perf_counter()
            r = requests.post(f"{base}/predict", json=body, timeout=120)
            took = time.perf_counter() - t0
            r.raise_for_status()
            out = r.json()["results"]
            if loading_ok and not out:  # the server loads the model in the background: no predictions yet
                return float("nan")
            assert len(out) == len(ids) and all(o["result"] for o in out), out[:2]
            return took

        batches = [sample[b:b + predict_batch] for b in range(0, len(sample), predict_batch)]
        assert wait_until(lambda: not math.isnan(predict(batches[0], loading_ok=True)), 120, 0.5), \
            f"the server did not load the model; its log:\n{log_path.read_text()[-4000:]}"
        for ids in batches:  # warm-up: the server's image and embedding caches
            predict(ids)
        rss0 = _status_kib("VmRSS", str(backend.pid)) / 1024
        t0 = time.perf_counter()
        lat = [predict(ids) for ids in batches]
        stages.rows["/predict warm"] = {"s": time.perf_counter() - t0, "peak_mib": _status_kib("VmHWM", str(backend.pid)) / 1024,
                                        "p50_ms": 1000 * statistics.median(lat),
                                        "p95_ms": 1000 * float(np.percentile(lat, 95))}
        print(f"  /predict warm: {stages.rows['/predict warm']}", flush=True)
        notes.append(f"/predict: {len(batches)} requests of {predict_batch} tasks; server RSS {rss0:.0f} MiB, "
                     "its peak is the server process's VmHWM (start included)")
        ls_rss = _status_kib("VmHWM", str(ls.proc.pid)) / 1024 if ls.proc else float("nan")
        return {"rows": stages.rows, "ls_rss_mib": ls_rss, "notes": notes}
    finally:
        stop_process(backend)
        ls.stop()
        if postgres is not None:
            postgres.stop()


THREADS = 1
PROFILE = False
LS_ENV: dict[str, str] = {}
DATABASE = "sqlite"


def database_line(database: str) -> str:
    """What Label Studio stored its data in (printed with the results)."""
    if database == "sqlite":
        return "SQLite (Label Studio's default), a fresh file per size"
    from tests.servers import postgres_bin_dir

    version = subprocess.run([str(postgres_bin_dir() / "postgres"), "--version"], capture_output=True,
                             text=True).stdout.strip()
    return (f"{version}, a throwaway cluster per size (initdb, its default settings, TCP on 127.0.0.1, "
            "on this machine's disk)")


def exponent(t1: float, t2: float, n1: int, n2: int) -> float:
    """The log-log slope between two sizes (1 = linear)."""
    return math.log(max(t2, 1e-6) / max(t1, 1e-6)) / math.log(n2 / n1)


def fitted_exponent(points: list[tuple[int, float]]) -> float:
    """The least-squares slope of log(time) against log(N) over all sizes (``t ≈ c·N^b``: returns b)."""
    x = np.log([n for n, _ in points])
    y = np.log([max(t, 1e-6) for _, t in points])
    return float(np.polyfit(x, y, 1)[0])


def report(head: list[str], sizes: list[int], results: dict[int, dict], args: argparse.Namespace) -> str:
    db = "PostgreSQL" if args.database == "postgresql" else "SQLite"
    lines = [f"# Scale: one Label Studio project ({db}) through " + ", ".join(f"{n:,}" for n in sizes) + " tasks",
             *head[1:]]  # date, command, machine and load as of the start of the run
    lines += [f"Changed public settings (else defaults): {', '.join(f'{k}={v}' for k, v in CHANGED_SETTINGS.items())}"
              " (no MoCo pretraining: it is capped by PRETRAIN_MAX_MINUTES whatever N).",
              f"Label Studio environment beyond tests/servers.py's: {args.ls_env or 'none'}.",
              f"Database: {database_line(args.database)}.",
              f"Images: {args.unique} distinct animal-mnist PNGs (28x28), task k shows image k mod {args.unique}; half the "
              "tasks labelled, 1 in 10 labelled tasks with a second annotation. Torch threads: 1.", "",
              "Wall seconds (peak RSS MiB of the benchmark process during the stage; for /predict: the server's):", ""]
    pairs = list(zip(sizes, sizes[1:]))
    fit = len(sizes) > 2
    exp_cols = [*(f"exponent {a:,}→{b:,}" for a, b in pairs), *(["fitted exponent"] if fit else [])]

    def exponents(times: list[float | None]) -> list[str]:
        out = [f"{exponent(a, b, n1, n2):.2f}" if a is not None and b is not None else "—"
               for (a, b), (n1, n2) in zip(zip(times, times[1:]), pairs)]
        if fit:
            known = [(n, t) for n, t in zip(sizes, times) if t is not None]
            out.append(f"{fitted_exponent(known):.2f}" if len(known) > 2 else "—")
        return out

    cols = ["stage", *(f"{n:,} tasks" for n in sizes), *exp_cols]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for stage in STAGES:
        cells, times = [], []
        for n in sizes:
            row = results[n]["rows"].get(stage)
            if row is None:
                cells.append("—")
                times.append(None)
                continue
            extra = f", p50 {row['p50_ms']:.0f} ms, p95 {row['p95_ms']:.0f} ms/request" if "p50_ms" in row else ""
            cells.append(f"{row['s']:.2f} s ({row['peak_mib']:.0f} MiB{extra})")
            times.append(row["s"])
        lines.append("| " + " | ".join([stage, *cells, *exponents(times)]) + " |")
    lines += ["", "CPU seconds of the stage, the benchmark process's (the training job runs in it) + Label Studio's and "
              "its database's (process trees; PostgreSQL's backends included), and the growth exponent of their sum "
              "(less sensitive to the machine's load than wall time):", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for stage in STAGES:
        cells, times = [], []
        for n in sizes:
            row = results[n]["rows"].get(stage)
            if row is None or "cpu_s" not in row:
                cells.append("—")
                times.append(None)
                continue
            cells.append(f"{row['cpu_s']:.1f} + {row['server_cpu_s']:.1f}")
            times.append(row["cpu_s"] + row["server_cpu_s"])
        if any(t is not None for t in times):
            lines.append("| " + " | ".join([stage, *cells, *exponents(times)]) + " |")
    lines.append("")
    for n in sizes:
        lines.append(f"N={n:,}: Label Studio peak RSS {results[n]['ls_rss_mib']:.0f} MiB")
        lines += [f"  {note}" for note in results[n]["notes"]]
    lines += ["", load_line("at the end")]
    return "\n".join(lines) + "\n"


def main() -> None:
    global THREADS, PROFILE, LS_ENV, DATABASE
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--unique", type=int, default=10000, help="distinct images (repeated over the tasks)")
    ap.add_argument("--batch", type=int, default=1000, help="tasks per import request")
    ap.add_argument("--predict-tasks", type=int, default=200)
    ap.add_argument("--predict-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.txt")
    ap.add_argument("--ls-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="environment of Label Studio, e.g. its feature flags (printed in the result)")
    ap.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite",
                    help="Label Studio's database: SQLite (its default) or a throwaway PostgreSQL cluster")
    ap.add_argument("--profile-prelabel", action="store_true", help="cProfile the bulk prediction write (printed)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one size in this process, JSON to --json
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    THREADS, PROFILE, DATABASE = args.threads, args.profile_prelabel, args.database
    LS_ENV = dict(kv.split("=", 1) for kv in args.ls_env)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.one:
        with tempfile.TemporaryDirectory(prefix=f"taxomoco-scale-{args.one}-") as tmp:
            out = one_size(args.one, args.unique, args.batch, args.predict_tasks, args.predict_batch, Path(tmp))
        args.json.write_text(json.dumps(out))
        return
    head = header("", list(sys.argv))
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="taxomoco-scale-") as tmp:
        for n in args.sizes:
            js = Path(tmp) / f"{n}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(n), "--json", str(js),
                   "--unique", str(args.unique), "--batch", str(args.batch), "--predict-tasks",
                   str(args.predict_tasks), "--predict-batch", str(args.predict_batch), "--threads",
                   str(args.threads), "--database", args.database]
            cmd += (["--profile-prelabel"] if PROFILE else []) + ["--ls-env", *args.ls_env]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
            subprocess.run(cmd, check=True, env=env, cwd=ROOT)
            results[n] = json.loads(js.read_text())
            done = [m for m in args.sizes if m in results]  # written after each size: a long size keeps the others
            write_result(args.out, report(head, done, results, args))


if __name__ == "__main__":
    main()
