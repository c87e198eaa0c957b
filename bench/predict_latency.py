"""Latency of /predict against the real server (waitress), side by side with the bare in-process model.

One run measures, on the same model (ResNet-18-half encoder + taxonomy heads, fixed seed) and the same
synthetic images (rendered colour shapes, 96x96 PNG, read through LOCAL_FILES_ROOT):

1. ``/predict`` p50/p95 latency and tasks/s for batches of 1, 8 and 64 tasks, with a cold embedding cache
   (images never seen) and a warm one (the same images again), over HTTP on loopback;
2. the in-process baseline on the same decoded images: ``Predictor.predict`` with no cache (a bare forward)
   and with a warm cache;
3. ``/health`` latency (p50/p95/p99/max) while 16 clients post ``/predict`` and a training job (a CPU-bound
   ResNet training loop in the embedded trainer's child process) runs.

Usage: ``.venv/bin/python bench/predict_latency.py [--quick] [--out bench/results/predict_latency.txt]``
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

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


LOAD_BEFORE = "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "predict_latency.txt")
    parser.add_argument("--serve", nargs=3, metavar=("MODEL_DIR", "IMAGES", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_main(Path(args.serve[0]), Path(args.serve[1]), int(args.serve[2]))
        return

    reps = {1: 10, 8: 6, 64: 3} if args.quick else {1: 30, 8: 15, 64: 6}
    health_seconds = 8.0 if args.quick else 20.0
    work = Path(tempfile.mkdtemp(prefix="taxomoco-bench-"))
    images = work / "images"
    images.mkdir()
    model_dir = work / "data"
    names_by_batch: dict[int, list[list[str]]] = {}
    n = 0
    for b, r in reps.items():
        names_by_batch[b] = []
        for _ in range(r + 1):  # +1: a warm-up batch
            batch = []
            for _ in range(b):
                (images / f"{n}.png").write_bytes(render(n))
                batch.append(f"{n}.png")
                n += 1
            names_by_batch[b].append(batch)

    from model.images import content_hash, load_image

    torch.set_num_threads(TORCH_THREADS)
    models_root = ProjectPaths(model_dir, PROJECT).models
    version = publish_model(models_root)
    bare = load_predictor(models_root, None)  # in-process, no cache: a bare forward
    cached = load_predictor(models_root, work / "inproc-cache")  # in-process, warm cache: heads only

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(TORCH_THREADS))
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", str(model_dir), str(images), str(port)], env=env, cwd=ROOT
    )

    def http_predict(batch: list[str]) -> float:
        t0 = time.perf_counter()
        out = post(base, "/predict", predict_body(batch))
        took = time.perf_counter() - t0
        assert len(out["results"]) == len(batch) and all(r["result"] for r in out["results"]), out
        assert {r["model_version"] for r in out["results"]} == {version}, out
        return took

    def inproc_predict(pred, d, h) -> float:
        t0 = time.perf_counter()
        pred.predict(d, h)
        return time.perf_counter() - t0

    try:
        wait_up(base, proc)
        post(base, "/setup", {"project": f"{PROJECT}.1700000000", "schema": CONFIG})
        times: dict[tuple[int, str], list[float]] = {}
        for b, batches in names_by_batch.items():
            decoded = [[load_image((images / m).read_bytes()) for m in batch] for batch in batches]
            hashes = [[content_hash((images / m).read_bytes()) for m in batch] for batch in batches]
            bare.predict(decoded[0], None)  # warm-up of every path for this batch size
            cached.predict(decoded[0], hashes[0])
            http_predict(batches[0])
            # interleaved, so that both sides see the same load of this shared machine
            for batch, d, h in zip(batches[1:], decoded[1:], hashes[1:]):
                times.setdefault((b, "bare"), []).append(inproc_predict(bare, d, None))
                times.setdefault((b, "http-cold"), []).append(http_predict(batch))
                cached.predict(d, h)  # fill the in-process cache with this batch
                times.setdefault((b, "inproc-warm"), []).append(inproc_predict(cached, d, h))
                times.setdefault((b, "http-warm"), []).append(http_predict(batch))
        del bare, cached
        health = health_under_load(base, names_by_batch[8], model_dir, health_seconds)
        idle = [timed_get(base + "/health") for _ in range(50)]
    finally:
        (model_dir / "stop-training").touch()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    text = report(reps, times, health, idle, args.quick)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def timed_get(url: str) -> float:
    t0 = time.perf_counter()
    urllib.request.urlopen(url, timeout=5).read()
    return time.perf_counter() - t0


def probe_health(base: str, seconds: float, send) -> None:
    """Child process: after a second of load, GET /health every 20 ms for ``seconds``; send the latencies."""
    time.sleep(1.0)
    lat: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        lat.append(timed_get(base + "/health"))
        time.sleep(0.02)
    send.send(lat)
    send.close()


def health_under_load(base: str, batches: list[list[str]], model_dir: Path, seconds: float) -> dict:
    """/health latencies while 16 /predict clients run and a training job runs."""
    post(base, "/webhook", {"action": "START_TRAINING", "project": {"id": PROJECT}})
    t0 = time.monotonic()
    while not post(base, "/job_status", {"project": PROJECT}).get("running"):
        if time.monotonic() - t0 > 30:
            raise RuntimeError("the training job did not start")
        time.sleep(0.2)
    stop = threading.Event()
    served = [0]
    errors: list[str] = []

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            try:
                post(base, "/predict", predict_body(batches[i % len(batches)]))
                served[0] += 1
            except Exception as exc:  # count and go on: the table reports them
                errors.append(repr(exc))
            i += 1

    # the prober runs in its own process: in this one it would wait for the GIL behind the 16 clients
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    prober = ctx.Process(target=probe_health, args=(base, seconds, send), daemon=True)
    prober.start()
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(16)]
    for t in threads:
        t.start()
    lat: list[float] = receive.recv()
    prober.join(10)
    running = bool(post(base, "/job_status", {"project": PROJECT}).get("running"))
    stop.set()
    for t in threads:
        t.join(130)
    return {"lat": lat, "predicts": served[0], "errors": len(errors), "training_running": running, "seconds": seconds}


def report(reps, times, health, idle, quick) -> str:
    ms = lambda s: f"{1000 * s:.1f}"  # noqa: E731
    lines = [
        "# /predict latency vs the bare in-process model (bench/predict_latency.py)",
        "",
        f"Machine: {os.cpu_count()} CPU cores (load average before the run: {LOAD_BEFORE}), torch {torch.__version__}, no GPU; "
        f"{'quick run' if quick else 'full run'}; model ResNet-18-half @64 px + 3-level heads (model.bundle); "
        "synthetic 96x96 PNG shapes read via LOCAL_FILES_ROOT; "
        f"real waitress server ({HTTP_THREADS} threads, 2 concurrent model forwards) on loopback; "
        f"torch threads {TORCH_THREADS} on both sides.",
        "",
        "| batch | cache | /predict p50 ms | /predict p95 ms | tasks/s | bare forward p50 ms | vs bare forward "
        "| in-process same cache p50 ms | vs in-process same cache |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in reps:
        bare = statistics.median(times[(b, "bare")])
        for phase, ref_key in (("cold", "bare"), ("warm", "inproc-warm")):
            t = times[(b, f"http-{phase}")]
            p50 = statistics.median(t)
            ref = statistics.median(times[(b, ref_key)])
            lines.append(
                f"| {b} | {phase} | {ms(p50)} | {ms(pct(t, 95))} | {b / p50:.1f} | {ms(bare)} | "
                f"{100 * (p50 - bare) / bare:+.0f}% | {ms(ref)} | {100 * (p50 - ref) / ref:+.0f}% |"
            )
    lat = health["lat"]
    lines += [
        "",
        "bare forward = Predictor.predict in this process on the already decoded images, no cache (encoder + heads).",
        "in-process same cache = the same call with the same cache state as the HTTP row (cold: no cache; warm: cached",
        "embeddings, heads only). /predict adds HTTP + JSON + file read + sha256 + cache lookups, and the PNG decode",
        "of the images whose embedding is not cached (all of them when cold, none when warm).",
        "",
        f"/health under 16 concurrent /predict clients (batches of 8) and a running training job "
        f"({health['seconds']:.0f} s, {len(lat)} probes, {health['predicts']} /predict answered, {health['errors']} errors, "
        f"training still running at the end: {health['training_running']}):",
        "",
        "| /health | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---|---|---|---|",
        f"| under load | {ms(pct(lat, 50))} | {ms(pct(lat, 95))} | {ms(pct(lat, 99))} | {ms(max(lat))} |",
        f"| idle | {ms(pct(idle, 50))} | {ms(pct(idle, 95))} | {ms(pct(idle, 99))} | {ms(max(idle))} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
