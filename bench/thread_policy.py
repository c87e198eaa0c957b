"""CPU threads of torch on a shared machine: embedding throughput per thread setting, alone and two processes at once.

The product's processes use torch's default intra-op threads (all cores, ``TORCH_THREADS=0``). On a machine whose
cores other processes also use, OpenMP threads that wait *actively* (libgomp's default spin before sleeping) burn
the cores the other threads of the same forward need. This benchmark measures ``Embedder.embed_tensors`` (the
product's embedding forward: eval, inference mode, channels-last) on fixed tensors ``(batch, 3, S, S)`` for:

- ``1 thread``: ``TORCH_THREADS=1``;
- ``all cores, active wait``: torch's default threads, ``OMP_WAIT_POLICY=ACTIVE`` (libgomp's behaviour when the
  variable is unset and nothing sets it);
- ``all cores, passive wait``: torch's default threads, ``OMP_WAIT_POLICY=PASSIVE`` (what ``taxomoco`` sets when
  the variable is unset, ``ml_backend/threads.py``);

each ``alone`` (one process) and as a ``pair`` (two processes at once: the server's /predict and a training
child). Every measurement is its own process (the OpenMP runtime reads the variable once, when it loads); the
variants alternate over ``--rounds`` rounds; images/s per process and CPU ms per image, median and spread.

Usage: ``nice .venv/bin/python bench/thread_policy.py [--rounds 3] [--seconds 10] [--out bench/results/thread_policy.txt]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, Path(__file__).resolve().parent):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from provenance import header, load_line, write_result  # noqa: E402

VARIANTS: dict[str, dict[str, str]] = {
    "1 thread": {"TORCH_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    "all cores, active wait": {"TORCH_THREADS": "0", "OMP_WAIT_POLICY": "ACTIVE"},
    "all cores, passive wait": {"TORCH_THREADS": "0", "OMP_WAIT_POLICY": "PASSIVE"},
}


def child(seconds: float, batch: int) -> None:
    """One measurement in this process: the settings come from the environment the parent set."""
    import torch

    from model.encoder.backbone import build_backbone
    from model.encoder.config import EncoderConfig
    from model.encoder.embedder import Embedder

    threads = int(os.environ["TORCH_THREADS"])
    if threads:
        torch.set_num_threads(threads)
    cfg = EncoderConfig()
    embedder = Embedder(build_backbone(cfg), cfg, device="cpu", batch_size=batch)
    x = torch.randn(batch, 3, cfg.input_size, cfg.input_size)  # (B, 3, S, S) already normalised
    embedder.embed_tensors(x)  # the first call builds the kernels
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        embedder.embed_tensors(x)
        n += batch
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"images_per_s": n / wall, "cpu_ms_per_image": 1000 * cpu / n,
                      "threads": torch.get_num_threads()}))


def measure(env: dict[str, str], processes: int, seconds: float, batch: int) -> list[dict[str, float]]:
    cmd = [sys.executable, __file__, "--child", "--seconds", str(seconds), "--batch", str(batch)]
    full = dict(os.environ, **env, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen(cmd, env=full, stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=600)
        if p.returncode:
            raise SystemExit(f"a measurement failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "thread_policy.txt")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.seconds, args.batch)
        return
    lines = header("Embedding throughput per torch thread setting on a shared machine")
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        for name, env in VARIANTS.items():
            for mode, processes in (("alone", 1), ("pair", 2)):
                rows = measure(env, processes, args.seconds, args.batch)
                results.setdefault((name, mode), []).extend(rows)
                print(f"round {r + 1} {name} {mode}: "
                      + ", ".join(f"{row['images_per_s']:.0f} img/s" for row in rows), flush=True)
    lines += [f"Embedding forward `Embedder.embed_tensors`, resnet18-half at the default input size, batch "
              f"{args.batch}, {args.seconds:.0f} s per measurement, {args.rounds} rounds (variants alternating). "
              "Per process: median (min-max) over rounds (and over both processes of a pair).", "",
              "| threads | OpenMP wait | processes at once | images/s per process | CPU ms per image |",
              "|---|---|---|---|---|"]
    for (name, mode), rows in results.items():
        threads, _, wait = name.partition(", ")
        lines.append(f"| {threads} | {wait or 'passive'} | {1 if mode == 'alone' else 2} | "
                     f"{spread([r['images_per_s'] for r in rows])} | "
                     f"{statistics.median(r['cpu_ms_per_image'] for r in rows):.2f} |")
    lines += ["", load_line("at the end")]
    write_result(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
