"""Time from a submitted annotation to the new model version in /setup (heads-only retrain), real servers.

Set-up (not timed): a real Label Studio 1.23 and a real ``taxomoco serve`` (embedded scheduler, the default
encoder settings) from ``tests/servers.py``; a project with the animal-mnist two-level taxonomy; ``--tasks``
(default 1,000) image tasks served from a Label Studio local-files storage, imported with one annotation
each; the backend connected (Label Studio creates its annotation webhook); the first training (MoCo
pretraining, capped by ``--pretrain-minutes``) and its publish.

Then ``--rounds`` rounds, each ``--gap`` seconds (default 5) after the previous job ended (an annotator's
pace; the backend warms up its next training process meanwhile): an annotator submits one annotation through
Label Studio's API; Label Studio posts ANNOTATION_CREATED to ``/webhook``; the benchmark posts ``/setup`` (the
body Label Studio sends) every 50 ms until ``model_version`` changes. Reported per round: that time, and the
job's own step durations from ``/job_status`` (the remainder is webhook delivery, the training process start,
the hot reload and /setup polling).

Baselines, side by side in the same run on the same 1,000 labelled tasks and cached embeddings, in this process:
- ``model.heads.training.fit``: 5-fold cross-validation (calibration temperature) + the final heads: what a retrain
  that cross-validates before publishing needs at least;
- ``model.heads.heads.train_heads``: the final heads alone: the floor of a retrain that reuses the last temperature
  (``CALIBRATION_REUSE_FRACTION``; the cross-validation then runs after publishing).

Usage: ``.venv/bin/python bench/retrain_latency.py [--tasks 1000] [--rounds 5] [--reuse-fraction 0.02]
[--out bench/results/retrain_latency.txt]`` (``--reuse-fraction 0``: every retrain cross-validates first).
(needs Label Studio in ``.ls-venv``: ``make label-studio``; and ``pip install --no-deps animal-mnist==0.4``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import requests  # noqa: E402

from bench.datasets import animal_label_config, load_animal_mnist, png_bytes, taxonomy_result  # noqa: E402
from ml_backend.labelstudio.label_config import parse_label_config  # noqa: E402
from ml_backend.paths import ProjectPaths  # noqa: E402
from tests.servers import BackendServer, LabelStudioServer, label_studio_binary, wait_until  # noqa: E402

STEPS = ("pull", "labels", "images", "embed", "fit", "publish")
"""Job steps before the version goes live (``durations_s`` of the job record)."""
AFTER = ("cross_validation", "disagreements")
"""Job steps after the version went live (not part of the measured latency)."""








class Bench:
    def __init__(self, work: Path, n_tasks: int, pretrain_minutes: float, reuse_fraction: float) -> None:
        self.work = work
        self.ls = LabelStudioServer(work / "ls", label_studio_binary())
        env = {"ENCODER_ARCH": "resnet18-half", "ENCODER_INPUT_SIZE": "64",  # the product's defaults
               "PRETRAIN_EPOCHS": "3", "PRETRAIN_MAX_MINUTES": str(pretrain_minutes), "PRETRAIN_BATCH_SIZE": "128",
               "MIN_LABELS_TO_TRAIN": "10", "LOG_LEVEL": "INFO", "CALIBRATION_REUSE_FRACTION": str(reuse_fraction)}
        self.backend = BackendServer(work / "backend", env=env)
        self.n_tasks = n_tasks
        self.config = animal_label_config()
        self.pid = 0
        self.task_ids: list[int] = []
        self.paths: list[tuple[str, str]] = []  # label path of each task, in task order
        self.files: list[Path] = []  # image file of each task

    def setup(self) -> None:
        print("starting Label Studio and the backend ...", flush=True)
        self.ls.start()
        self.backend.start()
        self.pid = self.ls.create_project(self.config, title="retrain latency")
        images, paths = load_animal_mnist()  # (10000, 28, 28) uint8, path per image
        folder = self.ls.files_root / "animal"
        folder.mkdir(parents=True, exist_ok=True)
        self.ls.api("POST", "/api/storages/localfiles", json={"project": self.pid, "path": str(folder),
                                                               "title": "animal", "use_blob_urls": False})
        tasks = []
        rng = np.random.default_rng(0)
        for i in rng.permutation(len(images))[: self.n_tasks]:
            name = f"{int(i):05d}.png"
            (folder / name).write_bytes(png_bytes(images[i]))
            path = tuple(paths[i])
            self.paths.append(path)
            self.files.append(folder / name)
            tasks.append({"data": {"image": f"/data/local-files/?d=animal/{name}"},
                          "annotations": [{"result": taxonomy_result(path), "completed_by": self.ls.admin.id}]})
        print(f"importing {len(tasks)} annotated tasks ...", flush=True)
        self.task_ids = self.ls.import_tasks(self.pid, tasks)
        assert len(self.task_ids) == self.n_tasks, (len(self.task_ids), self.n_tasks)
        self.ml = self.ls.api("POST", "/api/ml", json={"project": self.pid, "url": self.backend.url,
                                                        "title": "taxomoco"}).json()

    def setup_body(self) -> dict:
        return {"project": f"{self.pid}.{int(time.time())}", "schema": self.config, "hostname": self.ls.url,
                "access_token": self.ls.admin.token, "model_version": ""}

    def version(self) -> str:
        return requests.post(f"{self.backend.url}/setup", json=self.setup_body(), timeout=10).json()["model_version"]

    def job_status(self) -> dict:
        return requests.post(f"{self.backend.url}/job_status", json={"project": self.pid}, timeout=10).json()

    def first_training(self) -> float:
        print("first training (pretraining + heads) ...", flush=True)
        t0 = time.monotonic()
        self.ls.api("POST", f"/api/ml/{self.ml['id']}/train", json={})
        if not wait_until(lambda: self.version() != "untrained", 1800, 1.0):
            raise RuntimeError(f"the first training did not publish; log:\n{self.backend.log()[-5000:]}")
        took = time.monotonic() - t0
        wait_until(lambda: not self.job_status().get("running"), 600, 0.5)  # disagreements finish
        return took

    def round(self, k: int, gap_s: float) -> dict:
        """One annotation ``gap_s`` after the previous job ended → poll /setup until the version changes."""
        if not wait_until(lambda: not (s := self.job_status()).get("running") and not s.get("queued"), 600, 0.2):
            raise RuntimeError("the backend stayed busy")
        time.sleep(gap_s)
        old = self.version()
        task = self.task_ids[k]
        path = self.paths[k]
        wall0 = time.time()
        t0 = time.monotonic()
        self.ls.annotate(task, taxonomy_result(path))  # returns once Label Studio stored it (webhook sent)
        posted = time.monotonic() - t0
        seen = {}

        def changed() -> bool:
            seen["v"] = self.version()
            return seen["v"] != old

        if not wait_until(changed, 300, 0.05):
            raise RuntimeError(f"no new version after the annotation; log:\n{self.backend.log()[-5000:]}")
        total = time.monotonic() - t0
        wait_until(lambda: not self.job_status().get("running"), 300, 0.2)
        last = self.job_status().get("last_success") or {}
        result = last.get("result") or {}
        durations = result.get("durations_s") or {}
        calibration = "reused" if (result.get("calibration") or {}).get("reuse") else "cross-validated"
        finished = datetime.fromisoformat(last["finished_at"].replace("Z", "+00:00")).timestamp()
        job_start = finished - float(last["duration_s"]) - wall0  # seconds after the annotation was sent
        return {"total": total, "posted": posted, "durations": durations, "version": seen["v"], "job_start": job_start,
                "calibration": calibration}

    def baselines(self, reps: int) -> dict[str, list[float]]:
        """The heads fit in this process on the backend's cached embeddings of the same labelled tasks."""
        import torch

        from model.bundle import load_live
        from model.encoder.cache import EmbeddingCache
        from model.heads.heads import HeadsConfig, train_heads
        from model.heads.training import fit
        from model.images import content_hash

        torch.set_num_threads(1)
        paths = ProjectPaths(self.backend.model_dir, self.pid)
        manifest = load_live(paths.models).manifest
        cache = EmbeddingCache(paths.cache, manifest.encoder_version, manifest.embedding_dim)
        hashes = [content_hash(f.read_bytes()) for f in self.files]
        emb, found = cache.get(hashes)  # (N, D), (N,)
        assert found.all(), f"{int((~found).sum())} embeddings missing from the backend's cache"
        taxonomy = parse_label_config(self.config).taxonomy
        out: dict[str, list[float]] = {"fit": [], "train_heads": []}
        for _ in range(reps):
            t0 = time.perf_counter()
            fit(emb, self.paths, taxonomy, HeadsConfig())
            out["fit"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            train_heads(emb, taxonomy.encode_many(self.paths), taxonomy, HeadsConfig())
            out["train_heads"].append(time.perf_counter() - t0)
        return out  # seconds, torch on 1 thread

    def stop(self) -> None:
        self.backend.stop()
        self.ls.stop()


def report(args: argparse.Namespace, first: float, rounds: list[dict], base: dict[str, list[float]]) -> str:
    med = statistics.median
    totals = [r["total"] for r in rounds]
    lines = [
        "# Annotation -> new model version in /setup, heads-only retrain (bench/retrain_latency.py)",
        "",
        f"Machine: {os.cpu_count()} CPU cores, no GPU; real Label Studio 1.23 + `taxomoco serve` (embedded scheduler, "
        f"default encoder resnet18-half @64 px, CALIBRATION_REUSE_FRACTION={args.reuse_fraction:g}); {args.tasks} "
        "animal-mnist image tasks with one annotation each; "
        f"first training (MoCo pretraining, capped at {args.pretrain_minutes:g} min) published after {first:.0f} s "
        "(not part of the rounds).",
        "",
        f"Each round, {args.gap:g} s after the previous job ended (an annotator's pace): "
        "one annotation submitted through Label Studio's API -> its webhook -> heads-only retrain -> "
        "/setup polled every 50 ms until `model_version` changes. `to job start` = Label Studio's webhook, the "
        "scheduler and the training process start; step times are the job's own (`/job_status`); `rest` = the "
        "job's work between steps, the hot reload and the polling.",
        "",
        "| round | annotation -> new version in /setup, s | to job start | " + " | ".join(STEPS)
        + " | rest | calibration | after publish: " + " + ".join(AFTER) + " |",
        "|---|---|---|" + "---|" * (len(STEPS) + 3),
    ]
    for k, r in enumerate(rounds, 1):
        d = r["durations"]
        steps = [float(d.get(s, 0.0)) for s in STEPS]
        after = " + ".join(f"{float(d.get(s, 0.0)):.2f}" for s in AFTER)
        lines.append(f"| {k} | {r['total']:.2f} | {r['job_start']:.2f} | " + " | ".join(f"{x:.2f}" for x in steps)
                     + f" | {r['total'] - r['job_start'] - sum(steps):.2f} | {r['calibration']} | {after} |")
    lines += [
        "",
        "| | median s | max s |",
        "|---|---|---|",
        f"| **annotation -> new version (ours, end to end)** | {med(totals):.2f} | {max(totals):.2f} |",
        f"| baseline: `model.heads.training.fit` in-process on the same embeddings (5-fold calibration + final heads) | "
        f"{med(base['fit']):.2f} | {max(base['fit']):.2f} |",
        f"| baseline: `train_heads` alone in-process (the final heads only: the floor with a reused temperature) | "
        f"{med(base['train_heads']):.2f} | {max(base['train_heads']):.2f} |",
        "",
        f"Target: < 10 s on CPU. Rounds: {len(rounds)}. The first round's pull re-reads every task Label Studio changed "
        "less than 10 s (the pull's overlap) before the first training's pull, here the whole import; later rounds "
        "read the tasks changed since the previous pull. `after publish` runs once the version is live: the "
        "cross-validation a reused calibration skipped (for the disagreement flags and the next temperature).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pretrain-minutes", type=float, default=2.0)
    parser.add_argument("--gap", type=float, default=5.0,
                        help="seconds between the end of a job and the next annotation (an annotator's pace; the "
                             "backend warms up the next training process meanwhile, about 4 CPU-seconds)")
    parser.add_argument("--reuse-fraction", type=float, default=0.02,
                        help="the backend's CALIBRATION_REUSE_FRACTION (0: every retrain cross-validates before "
                             "publishing)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "retrain_latency.txt")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="taxomoco-retrain-"))
    bench = Bench(work, args.tasks, args.pretrain_minutes, args.reuse_fraction)
    try:
        bench.setup()
        first = bench.first_training()
        print(f"first training published after {first:.1f} s", flush=True)
        rounds = []
        for k in range(args.rounds):
            r = bench.round(k, args.gap)
            print(f"round {k + 1}: {r['total']:.2f} s  {r['durations']}", flush=True)
            rounds.append(r)
        base = bench.baselines(3)
    finally:
        bench.stop()
    text = report(args, first, rounds, base)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
