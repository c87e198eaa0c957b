"""A training through the product's RQ queue, run by ``taxomoco worker`` on a chosen device (CUDA on a GPU box).

Set-up (not timed): a real ``redis-server`` and a real Label Studio 1.23 (``tests/servers.py``), a project with a
two-level taxonomy (shape / colour) over ``--tasks`` synthetic PNG tasks served from a Label Studio local-files
storage, ``--labelled`` of them annotated (the label is what the image shows).

Timed: ``RQScheduler.schedule(project, "START_TRAINING", force_pretrain=True)`` (what ``/webhook`` calls with
``REDIS_URL`` set), then ``taxomoco worker --burst --device DEVICE`` in a child process until the queues are empty
(the training job and its pre-annotation job). Reported: the worker's exit, enqueue → job start, the job's own step
durations (``durations_s`` of the job record: pull, labels, images, pretrain, embed, fit, publish, ...), the
pretraining's images/s and device, the model choice, and the whole wall time. Every setting the worker ran with
is a public setting (environment variable) and is printed with the result.

Usage: ``.venv/bin/python bench/worker_queue.py [--device cuda] [--tasks 2000] [--labelled 200]
[--pretrain-minutes 2] [--out bench/results/worker_queue.txt]`` (``--dry-run``: CPU, 40 tasks, seconds of
pretraining; what ``bench/gpu.sh --dry-run`` and its test run; ``--write-images DIR`` only writes the synthetic
images, for the DDP step). Needs Label Studio in ``.ls-venv``
(``make label-studio``) and ``redis-server`` (``make redis-server``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from bench.provenance import header, load_line, write_result  # noqa: E402
from ml_backend.queue.factory import make_scheduler  # noqa: E402
from ml_backend.settings import Settings  # noqa: E402
from tests.servers import LabelStudioServer, RedisServer, label_studio_binary, stop_process  # noqa: E402

SHAPES = ("round", "square")
COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 200)}
PRETRAIN_KEYS = ("input_size", "images_per_second", "steps_done", "epochs_done", "finished_plan", "learned")
LABEL_CONFIG = (
    '<View><Image name="image" value="$image"/><Taxonomy name="taxonomy" toName="image" leafsOnly="true" '
    'maxUsages="1">' + "".join(f'<Choice value="{s}">' + "".join(f'<Choice value="{c}"/>' for c in COLOURS)
                               + "</Choice>" for s in SHAPES) + "</Taxonomy></View>"
)


def synthetic_task(i: int, px: int = 64) -> tuple[bytes, tuple[str, str]]:
    """Task ``i``: a PNG of one shape of one colour on a noisy background, and its path (shape, colour)."""
    rng = np.random.default_rng(i)
    shape, colour = SHAPES[i % 2], list(COLOURS)[(i // 2) % 2]
    arr = np.clip(rng.integers(90, 170) + rng.normal(0, 20, (px, px, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    x0, y0 = (int(v) for v in rng.integers(2, px // 3, 2))
    side = int(rng.integers(px // 3, px // 2))
    fill = tuple(int(np.clip(c + rng.integers(-30, 30), 0, 255)) for c in COLOURS[colour])
    (ImageDraw.Draw(img).ellipse if shape == "round" else ImageDraw.Draw(img).rectangle)(
        [x0, y0, x0 + side, y0 + side], fill=fill)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue(), (shape, colour)


def make_project(ls: LabelStudioServer, n_tasks: int, n_labelled: int) -> int:
    """A project of ``n_tasks`` local-files image tasks, the first ``n_labelled`` annotated."""
    pid = ls.create_project(LABEL_CONFIG, title="worker queue bench")
    folder = ls.files_root / "synthetic"
    folder.mkdir(parents=True, exist_ok=True)
    ls.api("POST", "/api/storages/localfiles", json={"project": pid, "path": str(folder), "title": "synthetic",
                                                     "use_blob_urls": False})
    tasks = []
    for i in range(n_tasks):
        data, path = synthetic_task(i)
        (folder / f"{i:06d}.png").write_bytes(data)
        task: dict = {"data": {"image": f"/data/local-files/?d=synthetic/{i:06d}.png"}}
        if i < n_labelled:
            result = [{"from_name": "taxonomy", "to_name": "image", "type": "taxonomy",
                       "value": {"taxonomy": [list(path)]}}]
            task["annotations"] = [{"result": result, "completed_by": ls.admin.id}]
        tasks.append(task)
    for start in range(0, len(tasks), 1000):
        ls.import_tasks(pid, tasks[start:start + 1000])
    return pid


def run(args: argparse.Namespace, work: Path) -> list[str]:
    """Start the servers, enqueue, run the worker; the result's lines."""
    redis_server = RedisServer(workdir=work / "redis")
    ls = LabelStudioServer(work / "ls", label_studio_binary())
    worker = None
    try:
        redis_server.start()
        ls.start()
        t0 = time.monotonic()
        pid = make_project(ls, args.tasks, args.labelled)
        import_s = time.monotonic() - t0
        env = {  # the worker's settings: public environment variables only
            "REDIS_URL": redis_server.url, "MODEL_DIR": str(work / "models"), "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.admin.token, "DEVICE": args.device,
            "PRETRAIN_MAX_MINUTES": str(args.pretrain_minutes), "MIN_LABELS_TO_TRAIN": "4",
        }
        env.update(dict(kv.split("=", 1) for kv in args.setting))
        settings = Settings.from_env(env=env)
        scheduler = make_scheduler(settings)
        enqueued_at = time.time()
        t_enqueue = time.monotonic()
        queued = scheduler.schedule(pid, "START_TRAINING", force_pretrain=True)
        log_path = work / "worker.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("TAXOMOCO_")} | env
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")]))
        with open(log_path, "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "ml_backend.cli", "worker", "--burst"], cwd=ROOT,
                                      env=child_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            code = worker.wait(timeout=args.timeout)
        worker_s = time.monotonic() - t_enqueue
        status = scheduler.status(pid)
        scheduler.close()
        success = status.get("last_success") or {}
        if code != 0 or status.get("last_outcome") != "succeeded":
            tail = log_path.read_text(errors="replace")[-4000:]
            raise RuntimeError(f"worker exit code {code}, last outcome {status.get('last_outcome')}: "
                               f"{json.dumps(status.get('last_failure'))[:1500]}\nworker log tail:\n{tail}")
        return report(args, env, queued, success, enqueued_at, import_s, worker_s, log_path)
    finally:
        stop_process(worker)
        ls.stop()
        redis_server.stop()


def report(args: argparse.Namespace, env: dict[str, str], queued: dict, success: dict, enqueued_at: float,
           import_s: float, worker_s: float, log_path: Path) -> list[str]:
    result = success.get("result") or {}
    durations = result.get("durations_s") or {}
    started = None
    if success.get("finished_at") and success.get("duration_s") is not None:
        started = datetime.fromisoformat(success["finished_at"]).timestamp() - float(success["duration_s"])
    pretrain = result.get("pretrain") or {}
    run_info = pretrain.get("run") or {}
    shown = {k: v for k, v in env.items() if k not in ("LABEL_STUDIO_API_KEY",)}
    lines = [
        f"Settings of the worker (environment): {' '.join(f'{k}={v}' for k, v in sorted(shown.items()))} "
        "(LABEL_STUDIO_API_KEY set, not shown).",
        f"Project: {args.tasks} synthetic 64 px PNG tasks (2 shapes x 2 colours), {args.labelled} annotated; "
        f"import into Label Studio {import_s:.1f} s (not part of the timing below).",
        f"Enqueued: {queued.get('action')} on `{queued.get('queue')}` as `{queued.get('job_id')}`.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| enqueue → worker exited (cold worker start, imports, training job, pre-annotation job) | {worker_s:.1f} |",
    ]
    if started is not None:
        lines.append(f"| enqueue → job start (job record: finished_at - duration_s) | {started - enqueued_at:.1f} |")
        lines.append(f"| the training job (duration_s of the record) | {float(success['duration_s']):.1f} |")
    for step, secs in durations.items():
        lines.append(f"| job step `{step}` | {float(secs):.2f} |")
    lines += [
        "",
        f"Published version: {success.get('version')}; model choice: "
        f"{json.dumps((result.get('model_choice') or {}).get('chosen'))}.",
        "Pretraining: " + json.dumps({k: run_info.get(k) for k in PRETRAIN_KEYS if k in run_info})
        + f" (reason: {pretrain.get('reason')}).",
        f"Worker log: device line: {device_line(log_path)}",
    ]
    return lines


def device_line(log_path: Path) -> str:
    """The worker's own statement of its device (its start-up log line), or a note that none was found."""
    for line in log_path.read_text(errors="replace").splitlines():
        if "device" in line.lower():
            return line.strip()[line.find("Worker"):][:300] if "Worker" in line else line.strip()[:300]
    return "(no device line in the worker log)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="DEVICE of the worker (cuda, cuda:N, cpu)")
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--labelled", type=int, default=200)
    p.add_argument("--pretrain-minutes", type=float, default=2.0, help="PRETRAIN_MAX_MINUTES of the worker")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="another public setting for the worker (environment variable), printed with the result")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds the worker may take")
    p.add_argument("--dry-run", action="store_true", help="CPU, 40 tasks, a few seconds of pretraining")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "worker_queue.txt")
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    p.add_argument("--write-images", type=Path, metavar="DIR",
                   help="only write --images synthetic PNGs of --px pixels into DIR (bench/gpu.sh's DDP step)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--px", type=int, default=64)
    args = p.parse_args()
    if args.write_images:
        args.write_images.mkdir(parents=True, exist_ok=True)
        for i in range(args.images):
            (args.write_images / f"{i:06d}.png").write_bytes(synthetic_task(i, args.px)[0])
        return
    if args.dry_run:
        args.device, args.tasks, args.labelled, args.pretrain_minutes = "cpu", 40, 20, 0.1
        args.setting += ["PRETRAIN_EPOCHS=1", "PRETRAIN_BATCH_SIZE=16", "TORCH_THREADS=1", "CV_FOLDS=2",
                         "MODEL_CANDIDATES=pixels+linear,encoder+prototypes"]
    head = header(f"A training through the RQ queue on `taxomoco worker --device {args.device}`")
    with tempfile.TemporaryDirectory(prefix="taxomoco-worker-bench-") as work:
        lines = run(args, Path(work))
    write_result(args.out, "\n".join(head + lines + ["", load_line("at the end")]) + "\n", append=args.append)


if __name__ == "__main__":
    main()
