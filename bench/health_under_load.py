"""/health latency while /predict clients send new images and a real MoCo pretraining runs (real servers).

Set-up (not timed): a real Label Studio 1.23 (SQLite, ``tests/servers.py``) and ``taxomoco serve`` on the product's
defaults (embedded scheduler: training in a child process; waitress, ``TAXOMOCO_HTTP_THREADS`` threads; torch on
all cores) with ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` set; a project of ``--tasks`` animal-mnist images
(upscaled to ``--size`` px with per-image noise, so the encoder runs at the product's CPU input size) served from a
local-files storage, ``--labelled`` of them labelled; the backend connected and a first training (fewer images
than ``PRETRAIN_MIN_IMAGES``: heads only) published.

Then, probing ``GET /health`` on a new connection every ``--probe-every`` s (as Label Studio does, 1 s timeout on
its side) for the whole of each phase:

1. ``idle``: nothing else (the baseline), ``--idle-s`` seconds;
2. ``predict``: ``--clients`` closed-loop clients post ``/predict`` for one task each, always a *new* image (never
   seen: its content hash is unique, so the fetch, decode and encoder forward run), ``--predict-s`` seconds;
3. ``predict + pretraining``: the same clients while ``POST /train {"force_pretrain": true}`` runs a real MoCo v2
   pretraining in the embedded trainer (all cores, ``PRETRAIN_MAX_MINUTES=--pretrain-minutes``, the one changed
   public setting, printed), from the request until the job has published and its after-publish work ended.

Reported per phase: /health p50 / p99 / max and probes over 100 ms / 1 s, /predict p50 / p95 and requests per
second, the load average. ``--rounds`` repeats phases 1-3 (one pretraining per round). Goal (issue 14): /health
p99 < 100 ms under phase 3's load.

Usage: ``nice .venv/bin/python bench/health_under_load.py [--quick] [--rounds 2] [--out bench/results/health_under_load.txt]``
(``--quick``: 1 round, shorter phases, 1-minute pretraining). Needs Label Studio in ``.ls-venv`` and
``pip install --no-deps animal-mnist==0.4``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from bench.backend_client import AUTH, BackendClient, DefaultsBackend, iso_ts, pct  # noqa: E402
from bench.datasets import animal_label_config, load_animal_mnist, png_bytes, taxonomy_result  # noqa: E402
from bench.provenance import header, load_line, write_result  # noqa: E402
from tests.servers import LabelStudioServer, label_studio_binary, log_tail, wait_until  # noqa: E402

PROBE_TIMEOUT_S = 5.0


def probe(port: int) -> float | None:
    """Seconds for one ``GET /health`` on a new connection (None: failed or not 200)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
    except OSError:
        ok = False
    finally:
        conn.close()
    return time.perf_counter() - t0 if ok else None


@dataclass
class Phase:
    """What one phase saw."""

    name: str
    health: list[float] = field(default_factory=list)  # seconds per answered probe
    failed: int = 0
    predict: list[float] = field(default_factory=list)  # seconds per /predict
    predict_failed: int = 0
    seconds: float = 0.0
    load: tuple[float, float, float] = (0.0, 0.0, 0.0)
    note: str = ""


class Bench:
    def __init__(self, work: Path, args: argparse.Namespace) -> None:
        self.work, self.args = work, args
        self.ls = LabelStudioServer(work / "ls", label_studio_binary())
        self.backend: DefaultsBackend | None = None
        self.config = animal_label_config()
        self.rng = np.random.default_rng(args.seed)
        self.images, self.paths = load_animal_mnist()  # (10000, 28, 28) uint8, path per image
        self.folder = self.ls.files_root / "animal"
        self.counter = 0
        self.counter_lock = threading.Lock()
        self.client: BackendClient  # once the project exists (setup)

    def picture(self, i: int, rng: np.random.Generator) -> bytes:
        """Image ``i`` upscaled to ``--size`` px, RGB, with uniform noise: unique content per call."""
        up = np.kron(self.images[i], np.ones((self.args.size // 28 + 1,) * 2, dtype=np.uint8))[:self.args.size, :self.args.size]
        rgb = np.repeat(up[..., None], 3, axis=2).astype(np.int16)
        rgb += rng.integers(-12, 13, size=rgb.shape, dtype=np.int16)
        return png_bytes(np.clip(rgb, 0, 255).astype(np.uint8))

    def setup(self) -> None:
        print("starting Label Studio and the backend ...", flush=True)
        self.ls.start()
        self.backend = DefaultsBackend(self.work / "backend", env={
            "PRETRAIN_MAX_MINUTES": f"{self.args.pretrain_minutes:g}", "LABEL_STUDIO_URL": self.ls.url,
            "LABEL_STUDIO_API_KEY": self.ls.admin.token, "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1]})
        self.backend.start()
        self.pid = self.ls.create_project(self.config, title="health under load")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ls.api("POST", "/api/storages/localfiles", json={"project": self.pid, "path": str(self.folder),
                                                               "title": "animal", "use_blob_urls": False})
        tasks = []
        for k, i in enumerate(self.rng.permutation(len(self.images))[:self.args.tasks]):
            (self.folder / f"t{k:05d}.png").write_bytes(self.picture(int(i), self.rng))
            task: dict[str, Any] = {"data": {"image": f"/data/local-files/?d=animal/t{k:05d}.png"}}
            if k < self.args.labelled:
                task["annotations"] = [{"result": taxonomy_result(tuple(self.paths[int(i)])),
                                        "completed_by": self.ls.admin.id}]
            tasks.append(task)
        self.ls.import_tasks(self.pid, tasks)
        self.ml = self.ls.connect_backend(self.pid, self.backend.url, auth_method="BASIC_AUTH",
                                          basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
        self.client = BackendClient(self.backend.url, self.pid, self.config, self.ls.url, self.ls.admin.token)
        print("first training (heads only) ...", flush=True)
        self.ls.api("POST", f"/api/ml/{self.ml['id']}/train", json={})
        self.client.wait_first_model(1800)

    # -- load --------------------------------------------------------------------------------------------
    def new_task(self, rng: np.random.Generator) -> dict[str, Any]:
        with self.counter_lock:
            self.counter += 1
            n = self.counter
        name = f"p{n:06d}.png"
        (self.folder / name).write_bytes(self.picture(int(rng.integers(len(self.images))), rng))
        return {"id": 1_000_000 + n, "data": {"image": f"/data/local-files/?d=animal/{name}"}}

    def predict_client(self, j: int, stop: threading.Event, phase: Phase) -> None:
        assert self.backend is not None
        rng = np.random.default_rng(self.args.seed * 1000 + j + self.counter)
        with requests.Session() as http_session:
            http_session.auth = AUTH
            while not stop.is_set():
                body = {"tasks": [self.new_task(rng)], "project": f"{self.pid}.1700000000",
                        "label_config": self.config, "params": {}}
                t0 = time.perf_counter()
                try:
                    r = http_session.post(f"{self.backend.url}/predict", json=body, timeout=60)
                    ok = r.status_code == 200 and bool(r.json().get("results"))
                except requests.RequestException:
                    ok = False
                if ok:
                    phase.predict.append(time.perf_counter() - t0)
                else:
                    phase.predict_failed += 1

    def run_phase(self, name: str, clients: int, until: Any) -> Phase:
        """Probe /health every ``--probe-every`` s while ``clients`` predict, until ``until()`` is true."""
        assert self.backend is not None
        phase = Phase(name)
        stop = threading.Event()
        threads = [threading.Thread(target=self.predict_client, args=(j, stop, phase), daemon=True)
                   for j in range(clients)]
        for t in threads:
            t.start()
        t0 = time.monotonic()
        next_probe = t0
        while not until(time.monotonic() - t0):
            took = probe(self.backend.port)
            if took is None:
                phase.failed += 1
            else:
                phase.health.append(took)
            next_probe += self.args.probe_every
            time.sleep(max(0.0, next_probe - time.monotonic()))
        phase.seconds = time.monotonic() - t0
        phase.load = os.getloadavg()
        stop.set()
        for t in threads:
            t.join(70)
        print(f"  {name}: {len(phase.health)} probes p50 {1000 * pct(phase.health, 50):.1f} ms p99 "
              f"{1000 * pct(phase.health, 99):.1f} ms max {1000 * max(phase.health, default=0):.0f} ms; "
              f"{len(phase.predict)} predictions p50 {1000 * pct(phase.predict, 50):.0f} ms", flush=True)
        return phase

    def training_phase(self) -> Phase:
        assert self.backend is not None
        before = (self.client.job_status().get("counts") or {}).get("succeeded", 0)
        r = requests.post(f"{self.backend.url}/train", json={"project": self.pid, "force_pretrain": True}, auth=AUTH,
                          timeout=10)
        r.raise_for_status()
        state = {"next": 0.0, "done": False}

        def finished(elapsed: float) -> bool:  # the job ended (published) and nothing of it runs any more
            if elapsed > 3600:
                raise RuntimeError("the pretraining job did not end within an hour")
            if elapsed >= state["next"]:
                state["next"] = elapsed + 2.0
                s = self.client.job_status()
                state["done"] = (s.get("counts") or {}).get("succeeded", 0) > before and not s.get("running") \
                    and (s.get("prelabel") or {}).get("state") != "running"
            return bool(state["done"])

        phase = self.run_phase("predict + pretraining", self.args.clients, finished)
        success = self.client.job_status().get("last_success") or {}
        result = success.get("result") or {}
        run = ((result.get("pretrain") or {}).get("run") or {})
        durations = result.get("durations_s") or {}
        phase.note = (f"job {success.get('duration_s', 0):.0f} s (pretrain {durations.get('pretrain', 0):.0f} s: "
                      f"{run.get('steps_done', '?')} steps, {run.get('epochs_done', '?')} epochs, "
                      f"{run.get('images_per_second', '?')} img/s; steps "
                      + ", ".join(f"{k} {float(v):.1f}" for k, v in durations.items()) + ")")
        if success.get("finished_at"):
            phase.note += f", finished {time.time() - iso_ts(success['finished_at']):.0f} s before the phase ended"
        return phase


def table(phases: list[tuple[int, Phase]]) -> list[str]:
    lines = ["| round | phase | s | /health probes | p50 ms | p99 ms | max ms | > 100 ms | > 1 s | failed | "
             "/predict (new image) n | p50 ms | p95 ms | req/s | load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, p in phases:
        h = p.health
        lines.append(
            f"| {r} | {p.name} | {p.seconds:.0f} | {len(h)} | {1000 * pct(h, 50):.1f} | {1000 * pct(h, 99):.1f} | "
            f"{1000 * max(h, default=float('nan')):.0f} | {sum(x > 0.1 for x in h)} | {sum(x > 1 for x in h)} | "
            f"{p.failed} | {len(p.predict)} | {1000 * pct(p.predict, 50):.0f} | {1000 * pct(p.predict, 95):.0f} | "
            f"{len(p.predict) / max(p.seconds, 1e-9):.1f} | {p.load[0]:.2f} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=400, help="project tasks (below PRETRAIN_MIN_IMAGES: the first "
                                                           "training is heads only)")
    ap.add_argument("--labelled", type=int, default=200)
    ap.add_argument("--size", type=int, default=96, help="image side in pixels")
    ap.add_argument("--clients", type=int, default=4, help="concurrent /predict clients")
    ap.add_argument("--probe-every", type=float, default=0.1)
    ap.add_argument("--idle-s", type=float, default=30.0)
    ap.add_argument("--predict-s", type=float, default=60.0)
    ap.add_argument("--pretrain-minutes", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 round, 15 s idle, 20 s predict, 1-minute pretraining")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.idle_s, args.predict_s, args.pretrain_minutes = 1, 15.0, 20.0, 1.0
    out = args.out or ROOT / "bench" / "results" / ("health_under_load" + ("_quick" if args.quick else "") + ".txt")
    argv = list(sys.argv)
    lines = header("/health under /predict load with new images and a real pretraining (bench/health_under_load.py)",
                   argv)
    lines += [f"Backend: `taxomoco serve` on the product's defaults (embedded scheduler, waitress); changed public "
              f"setting: PRETRAIN_MAX_MINUTES={args.pretrain_minutes:g}; LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY set. "
              f"Project: {args.tasks} animal-mnist images at {args.size} px ({args.labelled} labelled) in a real "
              "Label Studio 1.23 (SQLite).",
              f"Load: {args.clients} closed-loop /predict clients, one task per request, every image new (unique "
              f"content: fetched from Label Studio, decoded, embedded); GET /health on a new connection every "
              f"{1000 * args.probe_every:.0f} ms; the pretraining forced with POST /train "
              '{"force_pretrain": true}.', ""]
    phases: list[tuple[int, Phase]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="taxomoco-health-") as tmp:
        bench = Bench(Path(tmp), args)
        try:
            bench.setup()
            for r in range(1, args.rounds + 1):
                print(f"round {r}", flush=True)
                phases.append((r, bench.run_phase("idle", 0, lambda e: e >= args.idle_s)))
                phases.append((r, bench.run_phase("predict", args.clients, lambda e: e >= args.predict_s)))
                p = bench.training_phase()
                phases.append((r, p))
                notes.append(f"round {r}: {p.note}")
                if not wait_until(bench.client.idle, 600, 1.0):
                    raise RuntimeError("the backend stayed busy")
        except BaseException:
            if bench.backend is not None:
                print(log_tail(bench.backend.log_path, 6000), flush=True)
            raise
        finally:
            if bench.backend is not None:
                bench.backend.stop()
            bench.ls.stop()
    loaded = [p.health for _, p in phases if p.name == "predict + pretraining"]
    p99 = [pct(h, 99) for h in loaded]
    verdict = "met" if p99 and max(p99) < 0.1 else "missed"
    lines += table(phases)
    lines += ["", *notes, "",
              f"Goal /health p99 < 100 ms under /predict with new images and a real pretraining: **{verdict}** "
              f"(per round: {', '.join(f'{1000 * x:.1f} ms' for x in p99)}).", "", load_line("at the end"), ""]
    write_result(out, "\n".join(lines))


if __name__ == "__main__":
    main()
