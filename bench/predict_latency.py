"""Latency of /predict against the real server (waitress), side by side with the same work in process.

One run measures, on the same model (ResNet-18-half encoder + taxonomy heads, fixed seed) and the same
synthetic images (rendered colour shapes, 96x96 PNG, read through LOCAL_FILES_ROOT):

1. ``/predict`` latency for batches of 1, 8 and 64 tasks over HTTP on loopback, for *new* images (never seen:
   read, hash, decode, embed, heads, cache write) and for *cached* ones (the same batch again: read, hash, cache
   lookup, heads);
2. the same work in process, on the same batch, with its own embedding cache in the same state: read each file's
   bytes, ``content_hash``, ``Predictor.predict_encoded`` (header check, decode of the misses, embed, cache write,
   heads, path decoding) -- what /predict does minus HTTP, JSON, the request's set-up and the result items.
   Each pair (in process, HTTP) runs back to back, in alternating order, so both see the same load;
3. for every call, where its wall time went, the client's and the server's threads together: CPU time (the
   processes' CPU clocks) and time spent runnable but waiting for a core (run-queue wait, Linux
   ``/proc/<pid>/task/*/schedstat``). On a machine shared with other work, a request that passes from the client
   to the server's I/O thread, to a worker thread and back waits for a core at each hand-over; the work in process
   never hands over.

``--rounds`` rounds of ``reps`` batches each (new images every batch); the overhead of /predict over the
in-process work is taken per round (median over the round's pairs) and shown as mean ± std over rounds.
Goal: /predict at most 15 % over in process for new images.

Usage: ``.venv/bin/python bench/predict_latency.py [--quick] [--rounds 5] [--out bench/results/predict_latency.txt]``
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.provenance import header, load_line, write_result  # noqa: E402
from ml_backend.paths import ProjectPaths  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true">
    <Choice value="Shape"><Choice value="Round"><Choice value="Circle"/><Choice value="Ellipse"/></Choice>
      <Choice value="Angular"><Choice value="Square"/><Choice value="Triangle"/></Choice></Choice>
    <Choice value="Noise"/>
  </Taxonomy></View>"""
PROJECT = 1
SEED = 0
TRAIN_SECONDS = 600.0
TORCH_THREADS = 1
"""torch intra-op threads on both sides: on 2 cores shared with other processes, 2 OpenMP threads stall."""
HTTP_THREADS = 32
"""Server threads of the benchmark server: more than the 16 clients, so /health never queues behind /predict."""


# ----- the model ----------------------------------------------------------------------------------------
def publish_model(models_root: Path) -> str:
    """Publish the benchmark's model through model.bundle: a seeded ResNet-18-half encoder at 64 px and
    per-level heads of the config (untrained: latency does not depend on the weights)."""
    from ml_backend.labelstudio.label_config import parse_label_config
    from model.bundle import publish
    from model.encoder.backbone import build_backbone
    from model.encoder.config import EncoderConfig
    from model.heads.heads import TaxonomyHeads

    taxonomy = parse_label_config(CONFIG).taxonomy
    torch.manual_seed(SEED)
    cfg = EncoderConfig(arch="resnet18-half", input_size=64)
    backbone = build_backbone(cfg)
    heads = TaxonomyHeads(cfg.out_dim, [taxonomy.num_classes(k) for k in range(taxonomy.depth)])
    return publish(models_root, taxonomy, cfg, backbone.state_dict(), heads, 1.0, {}, "bench").version


def load_predictor(models_root: Path, cache_dir: Path | None):
    from model.bundle import load_live
    from model.predictor import Predictor

    return Predictor(load_live(models_root), cache_dir=cache_dir, device="cpu")


def training_job(project_id: int, model_dir: str, force_pretrain: bool = False) -> dict:
    """A stand-in training run with the CPU profile of one: ResNet-18-half SGD steps on 64 px batches."""
    from model.encoder.backbone import build_backbone
    from model.encoder.config import EncoderConfig

    net = build_backbone(EncoderConfig(arch="resnet18-half", input_size=64))
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    stop = Path(model_dir) / "stop-training"
    t0 = time.monotonic()
    steps = 0
    while time.monotonic() - t0 < TRAIN_SECONDS and not stop.exists():
        x = torch.randn(64, 3, 64, 64)  # (B, 3, S, S)
        loss = net(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    return {"version": None, "steps": steps}


def serve_main(model_dir: Path, images: Path, port: int) -> None:
    """The server process: the real server (waitress), the default store over the published bundle, the embedded
    trainer running :func:`training_job`."""
    from ml_backend.http.app import create_app
    from ml_backend.http.server import serve
    from ml_backend.queue.factory import make_scheduler
    from ml_backend.settings import Settings

    settings = Settings(
        host="127.0.0.1", port=port, model_dir=model_dir, local_files_root=images, log_level="WARNING", device="cpu",
        http_threads=HTTP_THREADS,
    )

    def factory(s: Settings):
        return create_app(s, scheduler=make_scheduler(s, job_func="bench.predict_latency.training_job"))

    serve(settings, app_factory=factory)


# ----- data ----------------------------------------------------------------------------------------------
def render(i: int, size: int = 96) -> bytes:
    rng = np.random.default_rng(i)
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 255, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size // 2, 2))
        x1, y1 = x0 + int(rng.integers(10, size // 2)), y0 + int(rng.integers(10, size // 2))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# ----- measuring -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One call: wall seconds, CPU seconds and run-queue seconds of the client and server processes together."""

    wall: float
    cpu: float
    waiting: float


def cpu_clock(pid: int) -> int | None:
    """The clock id of process ``pid``'s CPU time, all threads, up to date for running ones (POSIX
    ``clock_getcpuclockid``; None where the C library lacks it)."""
    try:
        clock = ctypes.c_int()
        if ctypes.CDLL(None).clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
            return clock.value
    except (OSError, AttributeError):
        pass
    return None


def run_queue_wait(pid: int) -> float:
    """Seconds the threads of ``pid`` were runnable but waiting for a core (Linux schedstat; NaN without it)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return float("nan")
    waiting = 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                waiting += int(f.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return waiting


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def post(base: str, path: str, body: dict, timeout: float = 120.0) -> dict:
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def predict_body(names: list[str]) -> dict:
    tasks = [{"id": i, "data": {"image": n}} for i, n in enumerate(names)]
    return {"tasks": tasks, "project": f"{PROJECT}.1700000000", "label_config": CONFIG, "params": {}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(base: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError("the benchmark server exited during start-up")
        try:
            urllib.request.urlopen(base + "/health", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the benchmark server did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of pairs; the spread is taken over rounds")
    parser.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predict_latency.txt")
    parser.add_argument("--serve", nargs=3, metavar=("MODEL_DIR", "IMAGES", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(Path(args.serve[0]), Path(args.serve[1]), int(args.serve[2]))
        return

    reps = {1: 6, 8: 4, 64: 2} if args.quick else {1: 12, 8: 6, 64: 3}  # pairs per round and batch size
    head = header("/predict over HTTP vs the same work in process")
    work = Path(tempfile.mkdtemp(prefix="taxomoco-bench-"))
    images = work / "images"
    images.mkdir()
    model_dir = work / "data"
    names_by_batch: dict[int, list[list[str]]] = {}
    n = 0
    for b, r in reps.items():
        names_by_batch[b] = []
        for _ in range(r * args.rounds + 1):  # +1: a warm-up batch
            batch = []
            for _ in range(b):
                (images / f"{n}.png").write_bytes(render(n))
                batch.append(f"{n}.png")
                n += 1
            names_by_batch[b].append(batch)

    from model.images import content_hash

    torch.set_num_threads(TORCH_THREADS)
    models_root = ProjectPaths(model_dir, PROJECT).models
    version = publish_model(models_root)
    # /predict serves only projects whose Label Studio connection was verified (by /setup against a real Label
    # Studio); none is needed to time /predict on local files, so the record of a verified one is written here
    connection = ProjectPaths(model_dir, PROJECT).connection
    connection.parent.mkdir(parents=True, exist_ok=True)
    connection.write_text(json.dumps({"url": "http://127.0.0.1:9", "api_key": "unused", "trusted": True,
                                      "verified_at": time.time()}))
    inproc = load_predictor(models_root, work / "inproc-cache")  # in process, its own embedding cache

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(TORCH_THREADS))
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(model_dir), str(images), str(port)], env=env, cwd=ROOT
    )

    server_clock = cpu_clock(proc.pid)

    def cpu_s() -> float:
        """CPU seconds of this process and of the server, all threads."""
        server = time.clock_gettime(server_clock) if server_clock is not None else float("nan")
        return time.process_time() + server

    def measured(call) -> Sample:
        """``call`` timed, with the CPU and run-queue time of the client and the server (both, for either side);
        the CPU clocks are read right next to the call, the server's ~40 thread files outside them."""
        w0 = run_queue_wait(proc.pid) + run_queue_wait(os.getpid())
        c0 = cpu_s()
        t0 = time.perf_counter()
        call()
        wall = time.perf_counter() - t0
        c1 = cpu_s()
        w1 = run_queue_wait(proc.pid) + run_queue_wait(os.getpid())
        return Sample(wall, c1 - c0, w1 - w0)

    def http_predict(batch: list[str]) -> Sample:
        out: dict = {}
        sample = measured(lambda: out.update(post(base, "/predict", predict_body(batch))))
        assert len(out["results"]) == len(batch) and all(r["result"] for r in out["results"]), out
        assert {r["model_version"] for r in out["results"]} == {version}, out
        return sample

    def inproc_predict(batch: list[str]) -> Sample:
        got: list = []

        def work() -> None:
            items = []
            for name in batch:
                data = (images / name).read_bytes()
                items.append((data, content_hash(data)))
            got.append(inproc.predict_encoded(items, leafs_only=True, prefix_threshold=0.2))

        sample = measured(work)
        preds, errors = got[0]
        assert not errors and all(p is not None for p in preds)
        return sample

    try:
        wait_up(base, proc)
        # no /setup: it verifies the project with Label Studio, and /predict carries the label config itself
        # times[(batch size, "new" | "cached", "http" | "inproc")][round] -> one Sample per pair
        times: dict[tuple[int, str, str], list[list[Sample]]] = {}
        for b, batches in names_by_batch.items():
            inproc_predict(batches[0])  # warm-up of every path for this batch size
            http_predict(batches[0])
            for k, batch in enumerate(batches[1:]):
                rnd = k // reps[b]
                for phase in ("new", "cached"):
                    order = (("inproc", inproc_predict), ("http", http_predict))
                    for side, fn in order if k % 2 == 0 else order[::-1]:  # alternate who goes first
                        rounds = times.setdefault((b, phase, side), [[] for _ in range(args.rounds)])
                        rounds[rnd].append(fn(batch))
        # where the fixed cost of a request goes: one HTTP round trip of a trivial endpoint on this server, and
        # the app itself on a cached batch of 1 through WSGI in this process (Flask's test client, no socket)
        floor = {"health": [], "wsgi": []}
        from ml_backend.http.app import create_app
        from ml_backend.settings import Settings

        client = create_app(Settings(model_dir=model_dir, local_files_root=images, log_level="WARNING",
                                     device="cpu")).test_client()
        one = names_by_batch[1][1]
        for _ in range(30):
            t0 = time.perf_counter()
            urllib.request.urlopen(base + "/health", timeout=10).read()
            floor["health"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert client.post("/predict", json=predict_body(one)).status_code == 200
            floor["wsgi"].append(time.perf_counter() - t0)
    finally:
        (model_dir / "stop-training").touch()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    text = "\n".join(head) + "\n" + report(reps, args.rounds, times, floor, args.quick)
    write_result(args.out, text + load_line("at the end") + "\n", append=args.append)


def report(reps, rounds, times, floor, quick) -> str:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    med = lambda samples, key: statistics.median(getattr(x, key) for x in samples)  # noqa: E731
    lines = [
        f"{'Quick run' if quick else 'Full run'}: model ResNet-18-half @64 px + 3-level heads (model.bundle); "
        "synthetic 96x96 PNG shapes read via LOCAL_FILES_ROOT; "
        f"real waitress server ({HTTP_THREADS} threads, 2 concurrent model forwards) on loopback, a new TCP connection "
        f"per request (urllib); torch threads {TORCH_THREADS} on both sides; {rounds} rounds of {reps} pairs "
        "(batch size: pairs).",
        "",
        "| batch | images | /predict median ms (p95) | in process median ms (p95) | /predict over in process, "
        "per round | mean ± std over rounds | CPU ms, /predict (client + server) / in process | "
        "waiting for a core ms, /predict / in process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for b in reps:
        for phase in ("new", "cached"):
            http, inproc = times[(b, phase, "http")], times[(b, phase, "inproc")]
            per_round = [100 * (med(h, "wall") / med(i, "wall") - 1) for h, i in zip(http, inproc)]
            mean = statistics.mean(per_round)
            std = statistics.stdev(per_round) if len(per_round) > 1 else 0.0
            flat_h = [x for r in http for x in r]
            flat_i = [x for r in inproc for x in r]
            wall_h, wall_i = [x.wall for x in flat_h], [x.wall for x in flat_i]
            cpu_h, cpu_i = med(flat_h, "cpu"), med(flat_i, "cpu")
            lines.append(
                f"| {b} | {phase} | {ms(statistics.median(wall_h))} ({ms(pct(wall_h, 95))}) | "
                f"{ms(statistics.median(wall_i))} ({ms(pct(wall_i, 95))}) | "
                + ", ".join(f"{x:+.0f}%" for x in per_round) + f" | {mean:+.0f}% ± {std:.0f} | "
                f"{ms(cpu_h)} / {ms(cpu_i)} ({100 * (cpu_h / cpu_i - 1) if cpu_i > 0 else float('nan'):+.0f}%) | "
                f"{ms(med(flat_h, 'waiting'))} / {ms(med(flat_i, 'waiting'))} |"
            )
            if phase == "new":
                gap_ms = 1000 * (statistics.median(wall_h) - statistics.median(wall_i))
                verdicts.append(f"batch {b}: {mean:+.0f}% ± {std:.0f} ({gap_ms:+.1f} ms) -> "
                                + ("met" if mean + std <= 15 else "missed" if mean - std > 15 else
                                   "not decided (15 % within one std)"))
    lines += [
        "",
        "Goal: /predict at most 15 % over in process for new images: " + "; ".join(verdicts) + ".",
        "",
        "In process = read the files' bytes + sha256 + `Predictor.predict_encoded` with its own embedding cache in the",
        "same state (new: decode + embed + cache write + heads; cached: cache lookup + heads). /predict adds the HTTP",
        "request and answer, JSON, the label config parse, the model store look-up, the image fetcher's guards",
        "(path checks under LOCAL_FILES_ROOT, size limits) and the Label Studio result items.",
        "CPU and waiting for a core: medians per call of the client's and the server's threads together (CPU clocks of",
        "both processes; Linux schedstat), in both columns: wall time = CPU + waiting for a core (+ waiting on each other).",
        "",
        f"Where the fixed cost goes (medians of 30): GET /health over HTTP on this server "
        f"{ms(statistics.median(floor['health']))} ms (a new TCP connection per request, as urllib and Label Studio's "
        f"client make; the request is handed from waitress's I/O thread to a worker thread); the whole app on a "
        f"cached batch of 1 through WSGI in this process, no socket: {ms(statistics.median(floor['wsgi']))} ms, against "
        f"{ms(med([x for r in times[(1, 'cached', 'inproc')] for x in r], 'wall'))} ms for the same work in process.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
