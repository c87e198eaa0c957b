"""Pretraining throughput: ``pretrain()`` (MoCoV2 through the Lightning Trainer) vs a bare PyTorch loop.

The bare loop is lightly's ``examples/pytorch/moco.py`` training loop: the same backbone, the same
``MoCoProjectionHead``, momentum copies, ``NTXentLoss`` with a memory bank, SGD, the same batch size,
input size, MoCo v2 transform and number of data loader workers, on the same synthetic images (coloured
rectangles and ellipses on noisy backgrounds, rendered here; no download). It runs once as in the example
(fp32, contiguous memory) and once with the same channels-last / precision settings ``pretrain()`` uses.

Each variant runs in its own child process (so peak RSS is its own) for the same number of optimiser
steps; images/s is measured over the training loop (data loading included, set-up and checkpoint
writing excluded for ours, after ``--warmup`` steps for both) and the whole call's wall time is shown too.

Usage: ``.venv/bin/python bench/pretrain_throughput.py [--arch resnet18-half] [--size 64] [--batch 64]
[--steps 20] [--workers 0] [--threads 2] [--out bench/results/pretrain_throughput.txt]``
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402


def synthetic_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` colour images ``(size, size, 3)`` uint8: a few filled shapes on a noisy background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        bg = rng.integers(0, 256, 3)
        arr = np.clip(bg + rng.normal(0, 12, (size, size, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 4)):
            x0, y0 = rng.integers(0, size // 2, 2)
            x1, y1 = np.array([x0, y0]) + rng.integers(size // 6, size // 2, 2)
            shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
            shape([int(x0), int(y0), int(x1), int(y1)], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        out.append(np.asarray(img))
    return out


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads: less sensitive to other jobs than wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(args: argparse.Namespace) -> dict:
    """``pretrain()`` for ``warmup + steps`` optimiser steps (epochs of ``images // batch`` steps)."""
    from pytorch_lightning.callbacks import Callback

    from model.encoder.config import EncoderConfig
    from model.ssl.config import PretrainConfig
    from model.ssl.pretrain import pretrain

    class Timer(Callback):
        """Times the optimiser steps after the warm-up, data loading included."""

        def __init__(self) -> None:
            self.t0, self.images, self.steps, self.t_last = 0.0, 0, 0, 0.0
            self.c0, self.c_last = 0.0, 0.0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == args.warmup:
                self.t0, self.c0 = time.perf_counter(), _cpu_s()
            elif trainer.global_step > args.warmup:
                self.images += len(batch[1])
                self.steps += 1
                self.t_last, self.c_last = time.perf_counter(), _cpu_s()
            if trainer.global_step >= args.warmup + args.steps:
                trainer.should_stop = True  # the same number of timed steps as the bare loop

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            # checkpoint writing (after this hook) is not part of the loop being compared
            self.pause = (time.perf_counter(), _cpu_s())

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            if hasattr(self, "pause") and self.t0:
                self.t0 += time.perf_counter() - self.pause[0]
                self.c0 += _cpu_s() - self.pause[1]

    total_steps = args.warmup + args.steps
    per_epoch = args.images // args.batch
    epochs = -(-total_steps // per_epoch)
    images = synthetic_images(args.images, args.image_px)
    enc = EncoderConfig(arch=args.arch, input_size=args.size)
    cfg = PretrainConfig(epochs=epochs, batch_size=args.batch, memory_bank_size=args.bank,
                         num_workers=args.workers, accelerator="cpu", precision=args.precision,
                         channels_last=not args.no_channels_last)
    timer = Timer()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        pretrain(images, enc, cfg, Path(out), resume=False, progress=False, callbacks=[timer])
    wall = time.perf_counter() - t0
    return {"images_per_s": timer.images / (timer.t_last - timer.t0), "steps": timer.steps,
            "images_per_cpu_s": timer.images / (timer.c_last - timer.c0),
            "wall_s": wall, "total_steps": epochs * per_epoch, "peak_rss_mib": _peak_rss_mib()}


def run_bare(args: argparse.Namespace, tuned: bool) -> dict:
    """lightly's plain PyTorch MoCo loop on the same data, model blocks and transform."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import MoCoProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule
    from torch.utils.data import DataLoader, Dataset

    from model.encoder.backbone import build_backbone
    from model.encoder.config import EncoderConfig
    from model.encoder.device import cpu_has_bf16
    from model.ssl.augment import moco_v2_transform

    torch.manual_seed(0)
    enc = EncoderConfig(arch=args.arch, input_size=args.size)
    images = synthetic_images(args.images, args.image_px)
    transform = moco_v2_transform(enc)

    class Views(Dataset):
        def __len__(self) -> int:
            return len(images)

        def __getitem__(self, i: int):
            return transform(Image.fromarray(images[i]))

    backbone = build_backbone(enc)
    head = MoCoProjectionHead(backbone.out_dim, 512, 128)
    backbone_m, head_m = copy.deepcopy(backbone), copy.deepcopy(head)
    deactivate_requires_grad(backbone_m)
    deactivate_requires_grad(head_m)
    criterion = NTXentLoss(temperature=0.2, memory_bank_size=(args.bank, 128))
    params = list(backbone.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)
    fmt = torch.channels_last if tuned else torch.contiguous_format
    bf16 = tuned and (args.precision == "bf16-mixed" or (args.precision is None and cpu_has_bf16()))
    for m in (backbone, head, backbone_m, head_m):
        m.to(memory_format=fmt)
    loader = DataLoader(Views(), batch_size=args.batch, shuffle=True, drop_last=True, num_workers=args.workers)
    total_steps = args.warmup + args.steps
    step, images_timed, t0, t_last, c0, c_last = 0, 0, 0.0, 0.0, 0.0, 0.0
    t_start = time.perf_counter()
    backbone.train(), head.train()
    while step < total_steps:
        for x_query, x_key in loader:
            m = cosine_schedule(step, total_steps, 0.996, 1.0)
            update_momentum(backbone, backbone_m, m=m)
            update_momentum(head, head_m, m=m)
            x_query = x_query.contiguous(memory_format=fmt)
            x_key = x_key.contiguous(memory_format=fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                query = head(backbone(x_query))
                with torch.no_grad():
                    key = head_m(backbone_m(x_key)).detach()
                loss = criterion(query, key)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if step == args.warmup:
                t0, c0 = time.perf_counter(), _cpu_s()
            elif step > args.warmup:
                images_timed += len(x_query)
                t_last, c_last = time.perf_counter(), _cpu_s()
            if step >= total_steps:
                break
    return {"images_per_s": images_timed / (t_last - t0), "steps": step - args.warmup,
            "images_per_cpu_s": images_timed / (c_last - c0),
            "wall_s": time.perf_counter() - t_start, "total_steps": step, "peak_rss_mib": _peak_rss_mib()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18-half", choices=["resnet18", "resnet18-half"])
    p.add_argument("--size", type=int, default=64, help="input size of the encoder (px)")
    p.add_argument("--image-px", type=int, default=80, help="side of the synthetic source images (px)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed optimiser steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimiser steps first")
    p.add_argument("--images", type=int, default=1536, help="synthetic images (an epoch = images // batch steps)")
    p.add_argument("--bank", type=int, default=2048, help="memory bank size")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default=None, help="Lightning precision for ours (default: auto)")
    p.add_argument("--no-channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=2, help="alternate the variants this many times")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "pretrain_throughput.txt")
    p.add_argument("--only", choices=["ours", "bare", "bare-tuned"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.only:
        result = run_ours(args) if args.only == "ours" else run_bare(args, tuned=args.only == "bare-tuned")
        print("RESULT " + json.dumps(result))
        return

    variants = {"bare-tuned": "bare lightly loop, channels-last/precision as ours",
                "ours": "ours: pretrain() (MoCoV2 + Lightning Trainer)",
                "bare": "bare lightly loop as in the example (fp32, contiguous)"}
    results: dict[str, list[dict]] = {k: [] for k in variants}
    forwarded = sys.argv[1:]
    names = list(variants)
    for rep in range(args.repeats):
        for name in names[rep % 3:] + names[:rep % 3]:  # rotate the order: load drifts during a run
            cmd = [sys.executable, __file__, *forwarded, "--only", name]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(line[0][7:]))
            print(f"repeat {rep + 1} {name}: {results[name][-1]}", flush=True)

    from model.encoder.device import cpu_has_bf16

    best = {k: max(r["images_per_s"] for r in v) for k, v in results.items()}
    cpu = {k: max(r["images_per_cpu_s"] for r in v) for k, v in results.items()}
    lines = [
        f"# Pretraining throughput ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
        "",
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
        f"CPU bf16: {cpu_has_bf16()}, no GPU. Shared with other jobs: numbers are noisy; best of "
        f"{args.repeats} runs in rotating order shown (all runs listed).",
        f"Setting: {args.arch} at {args.size} px, batch {args.batch}, memory bank {args.bank}, "
        f"{args.workers} loader workers, {args.steps} timed steps after {args.warmup} warm-up steps, "
        f"{args.images} synthetic {args.image_px}px colour images (rendered shapes), MoCo v2 transform.",
        "",
        "| variant | images/s (best) | runs images/s | ratio vs bare | images per CPU-s (best) | CPU ratio vs bare "
        "| wall s (last run) | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, desc in variants.items():
        runs = ", ".join(f"{r['images_per_s']:.1f}" for r in results[name])
        last = results[name][-1]
        lines.append(f"| {desc} | {best[name]:.1f} | {runs} | {best[name] / best['bare']:.2f} | {cpu[name]:.1f} | "
                     f"{cpu[name] / cpu['bare']:.2f} | {last['wall_s']:.1f} | "
                     f"{max(r['peak_rss_mib'] for r in results[name]):.0f} |")
    lines += ["", f"ours / bare = {best['ours'] / best['bare']:.2f} by wall clock, {cpu['ours'] / cpu['bare']:.2f} by CPU "
                  f"time (target >= 0.9); ours / bare-tuned = {best['ours'] / best['bare-tuned']:.2f} (wall), "
                  f"{cpu['ours'] / cpu['bare-tuned']:.2f} (CPU).",
              f"Load average when done: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores: "
              "wall-clock rates mostly measure the other jobs; images per CPU-second (user + system time of the "
              "process, all threads) is the steadier comparison.",
              "Wall time of ours includes Trainer set-up and one checkpoint per epoch."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
