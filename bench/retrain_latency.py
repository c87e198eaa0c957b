"""Annotation -> a live model version that includes it, under a stream of labels from 3 labelers (real servers).

Set-up per size N (not timed): a real Label Studio 1.23 (SQLite, ``tests/servers.py``, started with its
memory-efficient prediction import flag ``--ls-flag``, which a large deployment needs: ``docs/scaling.md``) and a
real ``taxomoco serve`` on the product's defaults (embedded scheduler; ``--scheduler rq``: ``REDIS_URL`` and one
``taxomoco worker``, the scale-out deployment) with ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` set; a project
with the animal-mnist two-level taxonomy and N image tasks (a Label Studio local-files storage; 10,000 distinct
images, repeated beyond), ``--initial`` of them labelled by the admin; the backend connected (Label Studio calls
/setup and creates its webhook); the first training, its publish and its bulk pre-annotation. The one changed public
setting, ``PRETRAIN_MIN_IMAGES`` (printed), keeps MoCo pretraining out of the first training: the stream's
retrains are heads-only on the live encoder whatever it is, and pretraining is capped by ``PRETRAIN_MAX_MINUTES``
whatever N (``bench/pretrain_throughput.py`` measures it).

The stream (timed, ``--minutes``): 3 labelers (Label Studio users with their own tokens), each submitting one
annotation every ``--every`` seconds through Label Studio's API, phase-shifted; Label Studio posts its webhooks
to the backend. Each action is NEW (``1 - --changed``: an unlabelled task, next in a shuffled order shared by the
labelers) or CHANGED (an already labelled task: half the time the labeler edits one of its own earlier annotations
to another leaf, ``PATCH``, Label Studio sends ANNOTATION_UPDATED; else it adds its own annotation to a task
another person labelled). Labelers err with probabilities ``--errors`` (a wrong leaf, drawn uniformly).

What is measured: a monitor posts ``/setup`` (the body Label Studio sends) every ``POLL_S`` and records when each
model version is first reported, and reads that version's manifest (``MODEL_DIR``): ``extra.pull.started_at`` is
when its training began to pull from Label Studio. A version *includes* an annotation when its pull started after
Label Studio had answered the annotation's request (everything Label Studio saved by then is read). The latency of
an annotation is from sending its request to the first report in /setup of a version that includes it; split into
``wait`` (send -> that version's pull starts: the job before it and that job's after-publish work), ``job``
(pull -> publish, the job's steps from ``/job_status``) and ``live`` (publish -> reported in /setup: the hot
reload). After the stream, the benchmark waits until the backend is idle, so every annotation gets its version.

Baselines in the same run, after each stream:
- ``idle``: ``--idle-rounds`` single annotations, each sent once the backend has been idle for ``--idle-gap`` s
  (the old benchmark's measure: a retrain with nothing queued ahead of it);
- in this process on the backend's cached features of the final labels: the live candidate's heads alone, started
  as a retrain starts them (from the heads of the same labels less 20: the version before 20 new labels) and from
  zero, and ``select_and_fit`` over every candidate (a retrain that cross-validates first).

Goal (issue 14): p95 < 10 s at 1,000 and 10,000 tasks.

Usage: ``nice .venv/bin/python bench/retrain_latency.py [--quick] [--sizes 1000 10000] [--minutes 4]
[--scheduler embedded|rq] [--out bench/results/retrain_latency_stream.txt]`` (``--quick``: 1,000 tasks, 90 s of
stream). ``bench/results/retrain_latency.txt`` is the result of the former single-annotation mode.
Needs Label Studio in ``.ls-venv`` (``make label-studio``), ``pip install --no-deps animal-mnist==0.4``, and for
``--scheduler rq`` a ``redis-server`` binary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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
from ml_backend.paths import ProjectPaths  # noqa: E402
from tests.servers import (  # noqa: E402
    LabelStudioServer,
    RedisServer,
    label_studio_binary,
    log_tail,
    stop_process,
    wait_until,
)

LS_FLAG = "fflag_fix_back_4620_memory_efficient_predictions_import_08012025_short"
"""Label Studio 1.23's flag for its linear prediction import (off: every import request recounts all tasks)."""
CHANGED_SETTINGS = {"PRETRAIN_MIN_IMAGES": "1000000"}
"""Public settings this benchmark changes from the product's defaults (printed with the results)."""
POLL_S = 0.1
"""How often the monitor asks /setup for the live version (the latency's resolution)."""
JOB_STEPS = ("pull", "labels", "images", "encoder", "embed", "fit", "neighbors", "publish")
"""Job steps before the version goes live."""
AFTER_STEPS = ("cross_validation", "disagreements")
"""Job steps after the version went live (they hold the job; the next job of the project waits for them)."""


# ---- servers ---------------------------------------------------------------------------------------------
@dataclass
class Event:
    """One labeler action and when it happened (wall clock, epoch seconds)."""

    labeler: int
    kind: str  # "new" | "changed-edit" | "changed-second"
    task: int
    sent: float
    answered: float
    correct: bool
    error: str | None = None


@dataclass
class Version:
    """A model version as the monitor saw it."""

    name: str
    seen: float  # first reported by /setup
    pull_started: float | None = None
    created: float | None = None
    pull: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)  # /job_status last_success.result of this version
    prelabel: dict[str, Any] = field(default_factory=dict)  # /job_status prelabel record of this version


class Stream:
    """One size: servers, project, first training, the stream, the baselines."""

    def __init__(self, work: Path, n: int, args: argparse.Namespace) -> None:
        self.work, self.n, self.args = work, n, args
        self.ls = LabelStudioServer(work / "ls", label_studio_binary())
        self.redis: RedisServer | None = None
        self.worker: subprocess.Popen | None = None
        self.backend: DefaultsBackend | None = None
        self.config = animal_label_config()
        self.pid = 0
        self.task_ids: list[int] = []
        self.truth: list[tuple[str, str]] = []  # per task, in task order
        self.hashes: list[str] = []
        self.labelled: set[int] = set()  # task indices with a human label
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.versions: dict[str, Version] = {}
        self.jobs: dict[str, dict[str, Any]] = {}  # version -> /job_status last_success.result
        self.prelabels: dict[str, dict[str, Any]] = {}  # version -> /job_status prelabel record
        self.stop_monitor = threading.Event()
        self.first_s = 0.0
        self.client: BackendClient  # once the project exists (build_project)
        self.notes: list[str] = []  # what went wrong in the baselines (printed with the results)
        self.idle_jobs: list[dict[str, Any]] = []  # per idle round: its version's job record and pull start

    # -- set-up ----------------------------------------------------------------------------------------
    def backend_env(self) -> dict[str, str]:
        return {**CHANGED_SETTINGS, "LABEL_STUDIO_URL": self.ls.url,
                "LABEL_STUDIO_API_KEY": self.ls.admin.token, "BASIC_AUTH_USER": AUTH[0], "BASIC_AUTH_PASS": AUTH[1],
                **({"REDIS_URL": self.redis.url} if self.redis is not None else {})}

    def start(self) -> None:
        os.environ.update(dict(kv.split("=", 1) for kv in self.args.ls_env))  # Label Studio inherits them
        print(f"N={self.n}: starting Label Studio ({' '.join(self.args.ls_env) or 'defaults'}) ...", flush=True)
        self.ls.start()
        if self.args.scheduler == "rq":
            self.redis = RedisServer(self.work / "redis")
            self.redis.start()
        self.backend = DefaultsBackend(self.work / "backend", env=self.backend_env())
        self.backend.start()
        if self.redis is not None:
            env = self.backend.environment()
            log = open(self.work / "worker.log", "ab")  # noqa: SIM115 (closed with the process)
            self.worker = subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "worker"], env=env, cwd=ROOT,
                                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def build_project(self) -> None:
        rng = np.random.default_rng(self.args.seed)
        self.pid = self.ls.create_project(self.config, title=f"retrain stream {self.n}")
        folder = self.ls.files_root / "animal"
        folder.mkdir(parents=True, exist_ok=True)
        self.ls.api("POST", "/api/storages/localfiles", json={"project": self.pid, "path": str(folder),
                                                               "title": "animal", "use_blob_urls": False})
        images, paths = load_animal_mnist()  # (10000, 28, 28) uint8, path per image
        order = rng.permutation(len(images))
        from model.images import content_hash

        written: dict[int, str] = {}
        tasks = []
        n_initial = int(round(self.args.initial * self.n))
        for k in range(self.n):
            i = int(order[k % len(order)])
            if i not in written:
                data = png_bytes(images[i])
                (folder / f"{i:05d}.png").write_bytes(data)
                written[i] = content_hash(data)
            self.truth.append(tuple(paths[i]))  # type: ignore[arg-type]
            self.hashes.append(written[i])
            task: dict[str, Any] = {"data": {"image": f"/data/local-files/?d=animal/{i:05d}.png"}}
            if k < n_initial:
                task["annotations"] = [{"result": taxonomy_result(tuple(paths[i])), "completed_by": self.ls.admin.id}]
                self.labelled.add(k)
            tasks.append(task)
        print(f"N={self.n}: importing {self.n} tasks ({n_initial} labelled) ...", flush=True)
        for b in range(0, self.n, 1000):
            self.task_ids += self.ls.import_tasks(self.pid, tasks[b:b + 1000])
        assert len(self.task_ids) == self.n, (len(self.task_ids), self.n)
        self.labelers = [self.ls.create_user(f"labeler{j}@taxomoco.test") for j in range(3)]
        assert self.backend is not None
        self.ml = self.ls.connect_backend(self.pid, self.backend.url, auth_method="BASIC_AUTH",
                                          basic_auth_user=AUTH[0], basic_auth_pass=AUTH[1])
        self.client = BackendClient(self.backend.url, self.pid, self.config, self.ls.url, self.ls.admin.token)

    def first_training(self) -> None:
        print(f"N={self.n}: first training ...", flush=True)
        t0 = time.monotonic()
        self.ls.api("POST", f"/api/ml/{self.ml['id']}/train", json={})
        self.client.wait_first_model(3600)
        self.first_s = time.monotonic() - t0
        print(f"N={self.n}: first model live and pre-annotation done after {self.first_s:.0f} s", flush=True)

    # -- the monitor -------------------------------------------------------------------------------------
    def _manifest(self, name: str) -> dict[str, Any]:
        assert self.backend is not None
        path = ProjectPaths(self.backend.model_dir, self.pid).models / "versions" / name / "manifest.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def monitor(self) -> None:
        last_status = 0.0
        while not self.stop_monitor.is_set():
            now = time.time()
            try:
                name = self.client.version()
            except (requests.RequestException, ValueError, KeyError):
                name = ""
            if name and name != "untrained" and name not in self.versions:
                v = Version(name, now)
                m = self._manifest(name)
                v.pull = dict((m.get("extra") or {}).get("pull") or {})
                v.pull_started = iso_ts(v.pull["started_at"]) if v.pull.get("started_at") else None
                v.created = iso_ts(m["created"]) if m.get("created") else None
                self.versions[name] = v
            if now - last_status > 0.25:  # the job's steps and the pre-annotation record of each version
                last_status = now
                try:
                    s = self.client.job_status()
                except (requests.RequestException, ValueError):
                    s = {}
                success = s.get("last_success") or {}
                if success.get("version"):
                    self.jobs[str(success["version"])] = dict(success.get("result") or {})
                pre = s.get("prelabel") or {}
                if pre.get("version"):
                    self.prelabels[str(pre["version"])] = dict(pre)
            time.sleep(POLL_S)

    # -- the labelers -----------------------------------------------------------------------------------
    def _label(self, rng: np.random.Generator, k: int, error: float) -> tuple[tuple[str, str], bool]:
        leaves = sorted(set(self.truth))
        if rng.random() < error:
            wrong = [p for p in leaves if p != self.truth[k]]
            return wrong[int(rng.integers(len(wrong)))], False
        return self.truth[k], True

    def labeler(self, j: int, until: float, queue: list[int]) -> None:
        rng = np.random.default_rng(self.args.seed * 100 + j)
        user = self.labelers[j]
        own: list[tuple[int, int, tuple[str, str]]] = []  # (task index, annotation id, label)
        error = self.args.errors[j % len(self.args.errors)]
        time.sleep(j * self.args.every / 3)  # phase shift
        tick = time.monotonic()
        while time.monotonic() < until:
            changed = rng.random() < self.args.changed
            sent = time.time()
            try:
                if changed and own and rng.random() < 0.5:  # edit one of its own annotations to another leaf
                    pos = int(rng.integers(len(own)))
                    k, ann, old = own[pos]
                    label = self.truth[k] if old != self.truth[k] else self._label(rng, k, 1.0)[0]
                    self.ls.api("PATCH", f"/api/annotations/{ann}/", token=user.token,
                                json={"result": taxonomy_result(label)})
                    own[pos] = (k, ann, label)
                    ev = Event(j, "changed-edit", k, sent, time.time(), label == self.truth[k])
                elif changed:  # its own annotation on a task someone else labelled
                    with self.lock:
                        pool = sorted(self.labelled - {k for k, _, _ in own})
                    k = pool[int(rng.integers(len(pool)))]
                    label, ok = self._label(rng, k, error)
                    ann = self.ls.annotate(self.task_ids[k], taxonomy_result(label), user=user)
                    own.append((k, ann, label))
                    ev = Event(j, "changed-second", k, sent, time.time(), ok)
                else:
                    with self.lock:
                        k = queue.pop()
                    label, ok = self._label(rng, k, error)
                    ann = self.ls.annotate(self.task_ids[k], taxonomy_result(label), user=user)
                    with self.lock:
                        self.labelled.add(k)
                    own.append((k, ann, label))
                    ev = Event(j, "new", k, sent, time.time(), ok)
            except (AssertionError, requests.RequestException, IndexError) as exc:
                ev = Event(j, "error", -1, sent, time.time(), False, f"{type(exc).__name__}: {exc}"[:300])
            with self.lock:
                self.events.append(ev)
            tick += self.args.every
            time.sleep(max(0.0, tick - time.monotonic()))

    def stream(self) -> None:
        rng = np.random.default_rng(self.args.seed + 7)
        queue = [int(k) for k in rng.permutation(sorted(set(range(self.n)) - self.labelled))]
        monitor = threading.Thread(target=self.monitor, daemon=True)
        monitor.start()
        time.sleep(1.0)
        print(f"N={self.n}: stream of {self.args.minutes:g} min ...", flush=True)
        until = time.monotonic() + 60 * self.args.minutes
        threads = [threading.Thread(target=self.labeler, args=(j, until, queue)) for j in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        last = max(e.answered for e in self.events)
        ok = wait_until(lambda: any(v.pull_started and v.pull_started > last for v in self.versions.values())
                        and self.client.idle(), 900, 0.5)
        time.sleep(1.0)
        self.stop_monitor.set()
        monitor.join()
        for name, v in self.versions.items():
            v.job, v.prelabel = self.jobs.get(name, {}), self.prelabels.get(name, {})
        if not ok:
            assert self.backend is not None
            print(f"warning: no version after the last annotation; log:\n{self.backend.log()[-3000:]}", flush=True)

    def idle_rounds(self) -> list[float]:
        """Single annotations sent to an idle backend (nothing queued or running for ``--idle-gap`` s)."""
        out = []
        rng = np.random.default_rng(self.args.seed + 11)
        left = sorted(set(range(self.n)) - self.labelled)
        for r in range(self.args.idle_rounds):
            try:
                self.client.wait_idle(stall_s=300)  # a clean-up of 10,000 tasks' predictions takes many minutes
                time.sleep(self.args.idle_gap)
                old = self.client.version()
                k = left[int(rng.integers(len(left)))]
                t0 = time.monotonic()
                self.ls.annotate(self.task_ids[k], taxonomy_result(self.truth[k]), user=self.labelers[0])
                self.labelled.add(k)
                sent = time.time()
                if not wait_until(lambda old=old: self.client.version() != old, 600, 0.05):  # type: ignore[misc]
                    raise RuntimeError("no new version within 600 s of the annotation")
            except (requests.RequestException, RuntimeError) as exc:  # recorded with the results, the run goes on
                self.notes.append(f"idle round {r + 1} failed, the remaining rounds were not run: "
                                  f"{type(exc).__name__}: {str(exc)[:200]}")
                print(f"  {self.notes[-1]}", flush=True)
                break
            out.append(time.monotonic() - t0)
            self.idle_jobs.append(self._idle_job(self.client.version(), sent))
            print(f"  idle round {r + 1}: {out[-1]:.2f} s; its job {self.idle_jobs[-1]}", flush=True)
        return out

    def _idle_job(self, version: str, sent: float) -> dict[str, Any]:
        """Where an idle round's time went: its version's job steps (/job_status, once the job record has them) and
        the wait from the annotation to its pull's start (the version's manifest)."""
        record: dict[str, Any] = {}

        def recorded() -> bool:
            success = self.client.job_status().get("last_success") or {}
            if success.get("version") == version:
                record.update(success.get("result") or {})
            return bool(record)

        wait_until(recorded, 120, 0.25)  # the job's after-publish work ends before its record is written
        started = (self._manifest(version).get("extra") or {}).get("pull", {}).get("started_at")
        return {"wait_s": round(iso_ts(started) - sent, 2) if started else None,
                "durations_s": record.get("durations_s", {}),
                "calibration": "reused" if (record.get("calibration") or {}).get("reuse") else "cross-validated",
                "pull": {k: (record.get("pull") or {}).get(k) for k in ("kind", "read")}}

    # -- the in-process baselines ---------------------------------------------------------------------------
    def baselines(self, reps: int) -> dict[str, Any]:
        """The live candidate's heads alone, and the model choice of every candidate, on the final labels."""
        from ml_backend.labelstudio.label_config import parse_label_config
        from ml_backend.settings import Settings
        from model.bundle import load_live
        from model.encoder.cache import EmbeddingCache
        from model.encoder.config import EncoderConfig
        from model.features.pixels import PixelFeatures
        from model.heads.candidates import CANDIDATES, FeatureSource, parse_candidates
        from model.heads.heads import HeadsConfig
        from model.heads.selection import select_and_fit
        from model.heads.training import labelled_rows
        from model.paired_gain import GainRule

        assert self.backend is not None
        paths = ProjectPaths(self.backend.model_dir, self.pid)
        manifest = load_live(paths.models).manifest
        settings = Settings()
        taxonomy = parse_label_config(self.config).taxonomy
        # the final consensus labels as the last job saw them would need the job; the truth of the labelled tasks
        # is the same amount of work (same rows, same features)
        rows = sorted(self.labelled)
        hashes = [self.hashes[k] for k in rows]
        targets = [self.truth[k] for k in rows]
        pix = PixelFeatures(max_pixels=settings.image_max_pixels)
        encoder_dim = EncoderConfig.from_dict(manifest.encoder).out_dim
        feats: dict[FeatureSource, np.ndarray] = {}
        for source, version, dim in ((FeatureSource.ENCODER, manifest.encoder_version, encoder_dim),
                                     (FeatureSource.PIXELS, pix.version, pix.out_dim)):
            x, found = EmbeddingCache(paths.cache, version, dim).get(hashes)  # (N, D), (N,)
            assert found.all(), f"{int((~found).sum())} {source.value} features missing from the backend's cache"
            feats[source] = x
        chosen = str(manifest.extra.get("model"))  # the published candidate's recipe
        candidate = CANDIDATES[chosen]
        labelled_index, encoded, _ = labelled_rows(feats[FeatureSource.ENCODER], targets, taxonomy)
        num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
        enabled = [c for c in parse_candidates(settings.model_candidates) if c.features in feats]
        out: dict[str, Any] = {"candidate": chosen, "n_labelled": len(rows), "heads": [], "heads_from_live": [],
                               "select_and_fit": []}
        x = feats[candidate.features]
        before = candidate.train(x[:-20], encoded[:-20], num_classes, HeadsConfig())  # the version before 20 new labels
        for _ in range(reps):
            t0 = time.perf_counter()
            candidate.train(x, encoded, num_classes, HeadsConfig(), before)
            out["heads_from_live"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            candidate.train(x, encoded, num_classes, HeadsConfig())
            out["heads"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            select_and_fit(feats, enabled, encoded, taxonomy, folds=settings.cv_folds, labelled_index=labelled_index,
                           heads_cfg=HeadsConfig(), rule=GainRule(settings.model_choice))
            out["select_and_fit"].append(time.perf_counter() - t0)
        return out

    def stop(self) -> None:
        if self.backend is not None:
            self.backend.stop()
        stop_process(self.worker)
        if self.redis is not None:
            self.redis.stop()
        self.ls.stop()


# ---- analysis --------------------------------------------------------------------------------------------
def latencies(events: list[Event], versions: dict[str, Version]) -> list[dict[str, Any]]:
    """Per annotation: the first version (by report time) whose pull started after its answer, and the split."""
    ordered = sorted((v for v in versions.values() if v.pull_started is not None), key=lambda v: v.seen)
    out: list[dict[str, Any]] = []
    for e in events:
        if e.error is not None:
            continue
        v = next((v for v in ordered if v.pull_started is not None and v.pull_started >= e.answered), None)
        if v is None:
            out.append({"event": e, "version": None})
            continue
        assert v.pull_started is not None
        created = v.created if v.created is not None else v.seen
        out.append({"event": e, "version": v, "total": v.seen - e.sent, "wait": v.pull_started - e.sent,
                    "job": created - v.pull_started, "live": v.seen - created})
    return out


def summary_rows(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    done = [r for r in rows if r.get("version") is not None]
    out = {}
    for key in ("total", "wait", "job", "live"):
        vals = [r[key] for r in done]
        out[key] = {"p50": pct(vals, 50), "p95": pct(vals, 95), "max": max(vals) if vals else float("nan")}
    return out


def version_table(s: Stream, t0: float) -> list[str]:
    lines = ["| version (seen at, s) | pull | calibration | " + " | ".join(JOB_STEPS[1:]) + " | after publish: "
             + " + ".join(AFTER_STEPS) + " | prelabel: written, s | gap to next pull, s |",
             "|---|---|---|" + "---|" * (len(JOB_STEPS) - 1) + "---|---|---|"]
    ordered = sorted(s.versions.values(), key=lambda v: v.seen)
    for v, nxt in zip(ordered, ordered[1:] + [None]):
        d = (v.job.get("durations_s") or {})
        calib = "reused" if (v.job.get("calibration") or {}).get("reuse") else "cross-validated"
        pull = f"{v.pull.get('kind', '?')} {v.pull.get('read', '?')} read, {float(d.get('pull', 0)):.2f}"
        pre = v.prelabel
        pre_s = "—"
        if pre.get("started_at") and pre.get("finished_at"):
            pre_s = f"{pre.get('created', 0)} ({pre.get('state')}), {iso_ts(pre['finished_at']) - iso_ts(pre['started_at']):.1f}"
        elif pre:
            pre_s = f"{pre.get('created', 0)} ({pre.get('state')})"
        gap = f"{nxt.pull_started - (v.created or v.seen):.2f}" if nxt is not None and nxt.pull_started else "—"
        lines.append(f"| {v.seen - t0:.1f} | {pull} | {calib} | "
                     + " | ".join(f"{float(d.get(k, 0)):.2f}" for k in JOB_STEPS[1:])
                     + " | " + " + ".join(f"{float(d.get(k, 0)):.2f}" for k in AFTER_STEPS) + f" | {pre_s} | {gap} |")
    return lines


def report_size(s: Stream, rows: list[dict[str, Any]], idle: list[float], base: dict[str, Any]) -> list[str]:
    sm = summary_rows(rows)
    events = [e for e in s.events if e.error is None]
    errors = [e for e in s.events if e.error is not None]
    kinds = {k: sum(e.kind == k for e in events) for k in ("new", "changed-edit", "changed-second")}
    lag = [e.answered - e.sent for e in events]
    missing = sum(r.get("version") is None for r in rows)
    goal = sm["total"]["p95"] < 10.0
    t0 = min((e.sent for e in s.events), default=0.0)
    lines = [f"## {s.n:,} tasks ({s.args.scheduler} scheduler)", "",
             f"First training (not timed): {s.first_s:.0f} s to a live model with its pre-annotation written. "
             f"Stream: {len(events)} annotations in {s.args.minutes:g} min from 3 labelers ({kinds['new']} new, "
             f"{kinds['changed-edit']} edited, {kinds['changed-second']} second opinions; "
             f"{sum(not e.correct for e in events)} disagree with the truth), {len(errors)} failed requests"
             + (f" (first: {errors[0].error})" if errors else "")
             + f"; Label Studio answered the annotation requests in p50 {1000 * pct(lag, 50):.0f} ms, "
             f"max {1000 * max(lag):.0f} ms. {len(s.versions)} versions went live during the stream; "
             f"{missing} annotations without a version including them at the end.", "",
             "| annotation -> live version including it | p50 s | p95 s | max s |", "|---|---|---|---|"]
    names = {"total": "**end to end (ours, under the stream)**", "wait": "wait: send -> its version's pull starts",
             "job": "job: pull -> publish", "live": "live: publish -> reported in /setup"}
    for key, name in names.items():
        lines.append(f"| {name} | {sm[key]['p50']:.2f} | {sm[key]['p95']:.2f} | {sm[key]['max']:.2f} |")
    if idle:
        lines.append(f"| baseline: one annotation to an idle backend ({len(idle)} rounds, "
                     f"{s.args.idle_gap:g} s after the last job) | {pct(idle, 50):.2f} | {pct(idle, 95):.2f} | "
                     f"{max(idle):.2f} |")
    if base:
        for key, name in (("heads_from_live", f"baseline in process: the live candidate ({base['candidate']}) fitted "
                                              f"alone on {base['n_labelled']} labels from the heads of all but 20 of "
                                              "them (a retrain's floor)"),
                          ("heads", "baseline in process: the same fit from zero"),
                          ("select_and_fit", "baseline in process: `select_and_fit` over the candidates (a retrain "
                                             "that cross-validates first)")):
            vals = base[key]
            lines.append(f"| {name} | {pct(vals, 50):.2f} | — | {max(vals):.2f} |")
    lines += [""] + [f"Note: {note}" for note in s.notes] + (["", ] if s.notes else [])
    for r, (total, job) in enumerate(zip(idle, s.idle_jobs)):
        lines.append(f"Idle round {r + 1}: {total:.2f} s; annotation -> its pull started {job['wait_s']} s (1-s stamps); pull "
                     f"{job['pull']['kind']} ({job['pull']['read']} read); calibration {job['calibration']}; job steps "
                     + ", ".join(f"{k} {float(v):.2f}" for k, v in job["durations_s"].items()) + ".")
    if s.idle_jobs:
        lines.append("")
    lines += [f"Goal p95 < 10 s: **{'met' if goal else 'missed'}** ({sm['total']['p95']:.2f} s).", "",
              "Each version, in the order /setup reported it (its job's steps from /job_status, seconds; `gap` = "
              "from its publish to the next job's pull start: its after-publish work, pre-annotation and the next "
              "training process's start):", ""]
    lines += version_table(s, t0)
    return lines + [""]


def run_size(n: int, args: argparse.Namespace, work: Path) -> list[str]:
    s = Stream(work / f"n{n}", n, args)
    try:
        s.start()
        s.build_project()
        s.first_training()
        s.stream()
        rows = latencies(s.events, s.versions)
        idle = s.idle_rounds()
        base = s.baselines(args.baseline_reps) if args.baseline_reps > 0 else {}
        return report_size(s, rows, idle, base)
    except BaseException:
        if s.backend is not None:
            print(log_tail(s.backend.log_path, 6000), flush=True)
        raise
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--minutes", type=float, default=4.0, help="length of each stream")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between two annotations of one labeler")
    ap.add_argument("--changed", type=float, default=0.2, help="share of actions on already labelled tasks")
    ap.add_argument("--errors", type=float, nargs=3, default=[0.0, 0.1, 0.25],
                    help="probability of a wrong leaf, per labeler")
    ap.add_argument("--initial", type=float, default=0.2, help="share of tasks labelled before the first training")
    ap.add_argument("--scheduler", choices=("embedded", "rq"), default="embedded")
    ap.add_argument("--idle-rounds", type=int, default=3)
    ap.add_argument("--idle-gap", type=float, default=8.0)
    ap.add_argument("--baseline-reps", type=int, default=3)
    ap.add_argument("--ls-env", nargs="*", default=[f"{LS_FLAG}=true"], metavar="NAME=VALUE",
                    help="Label Studio's environment (its feature flags), printed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1,000 tasks, 1.5 min of stream, 2 idle rounds, 1 baseline")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep the servers' files (logs, models) here")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.minutes, args.idle_rounds, args.baseline_reps = [1000], 1.5, 2, 1
    name = "retrain_latency_stream" + ("_quick" if args.quick else "") + ("_rq" if args.scheduler == "rq" else "")
    out = args.out or ROOT / "bench" / "results" / f"{name}.txt"
    argv = list(sys.argv)
    lines = header("Annotation -> live model version under a stream of 3 labelers (bench/retrain_latency.py)", argv)
    lines += [f"Backend: `taxomoco serve` on the product's defaults ({args.scheduler} scheduler"
              + (", one `taxomoco worker`" if args.scheduler == "rq" else "") + "); changed public setting: "
              + ", ".join(f"{k}={v}" for k, v in CHANGED_SETTINGS.items())
              + " (no MoCo pretraining in the first training); LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY and Basic auth "
              "set (the recommended deployment).",
              f"Label Studio 1.23 (SQLite) environment: {' '.join(args.ls_env) or 'defaults'}.",
              f"Load: 3 labelers x one annotation every {args.every:g} s ({3 / args.every:.1f}/s), "
              f"{args.changed:.0%} on already labelled tasks, labeler error rates {args.errors}; "
              f"{args.initial:.0%} of the tasks labelled before the first training; /setup polled every "
              f"{1000 * POLL_S:.0f} ms.", ""]
    started = time.strftime("%H:%M")
    with tempfile.TemporaryDirectory(prefix="taxomoco-stream-") as tmp:
        for n in args.sizes:
            lines += run_size(n, args, args.work or Path(tmp))
            write_result(out, "\n".join(lines + [load_line(f"after {n:,} tasks (run started {started} UTC)"), ""]))


if __name__ == "__main__":
    main()
