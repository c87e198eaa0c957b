"""How fast are the taxonomy heads? ``fit`` (5-fold calibration + final heads) and ``train_heads`` on 10k x 512.

Data: synthetic embeddings (no images): 12 leaf classes under 4 top-level classes, one random Gaussian centre
per leaf in 512-d plus isotropic noise, so the task is learnable but not trivial. 10,000 embeddings train,
2,000 more are held out. The baseline in the same run is scikit-learn's LogisticRegression (lbfgs, on
standardised embeddings) predicting the leaf class, whose parent gives the top level.

Usage:
    python bench/heads_speed.py [--n 10000] [--dim 512] [--threads 1] [--noise 9] [--out bench/results/heads_speed.txt]

Prints a markdown table and writes it (with the machine's description) to ``--out``. Both wall-clock and
process CPU seconds are reported: on a shared machine the wall clock includes time spent waiting for a core.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from model.heads.heads import HeadsConfig
from model.heads.mlp_training import train_heads
from model.heads.training import fit, predict
from model.taxonomy import Taxonomy


def make_data(n: int, dim: int, noise: float, seed: int = 0) -> tuple[Taxonomy, np.ndarray, np.ndarray]:
    """Taxonomy (4 x 3 leaves), embeddings ``(n, dim)`` float32 and leaf ids ``(n,)``."""
    taxonomy = Taxonomy.from_nested({f"group{g}": [f"leaf{g}{j}" for j in range(3)] for g in range(4)})
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(12, dim))  # (12, D)
    leaf = rng.integers(0, 12, n)
    emb = (centres[leaf] + rng.normal(size=(n, dim)) * noise).astype(np.float32)  # (n, D)
    return taxonomy, emb, leaf


def path_accuracy(pred_paths: list[tuple[str, ...]], truth: list[tuple[str, ...]]) -> float:
    return float(np.mean([p == t for p, t in zip(pred_paths, truth)]))


def top_accuracy(pred_paths: list[tuple[str, ...]], truth: list[tuple[str, ...]]) -> float:
    return float(np.mean([p[0] == t[0] for p, t in zip(pred_paths, truth)]))


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="training embeddings")
    ap.add_argument("--test", type=int, default=2_000, help="held-out embeddings")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--noise", type=float, default=9.0, help="noise scale; higher is harder")
    ap.add_argument("--threads", type=int, default=1, help="torch / BLAS threads")
    ap.add_argument("--out", type=Path, default=Path("bench/results/heads_speed.txt"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    taxonomy, emb, leaf = make_data(args.n + args.test, args.dim, args.noise)
    leaves = [node.path for node in taxonomy.leaves()]
    paths = [leaves[i] for i in leaf]
    x_tr, x_te = emb[: args.n], emb[args.n :]
    p_tr, p_te = paths[: args.n], paths[args.n :]
    y_tr = taxonomy.encode_many(p_tr)
    cfg = HeadsConfig()
    rows = []

    t, c = time.perf_counter(), time.process_time()
    heads = train_heads(x_tr, y_tr, taxonomy, cfg)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    pred = [p.path for p in predict(heads, 1.0, x_te, taxonomy)]
    rows.append(("`train_heads` (2 heads, 5 epochs)", dt, dc, path_accuracy(pred, p_te), top_accuracy(pred, p_te), ""))

    t, c = time.perf_counter(), time.process_time()
    result = fit(x_tr, p_tr, taxonomy, cfg, folds=5)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    pred = [p.path for p in predict(result.heads, result.temperature, x_te, taxonomy)]
    m = result.metrics
    note = (f"OOF path acc {m['path_accuracy']:.3f}, T = {result.temperature:.2f}, "
            f"ECE {m['ece_uncalibrated']:.3f} -> {m['calibration']['ece']:.3f}")
    rows.append(("`fit` (5-fold OOF + temperature + metrics + final heads)", dt, dc, path_accuracy(pred, p_te),
                 top_accuracy(pred, p_te), note))

    t, c = time.perf_counter(), time.process_time()
    preds = predict(result.heads, result.temperature, x_te, taxonomy)
    dt, dc = time.perf_counter() - t, time.process_time() - c
    rows.append((f"`predict` {args.test} embeddings (heads + best-path decode)", dt, dc,
                 path_accuracy([p.path for p in preds], p_te), top_accuracy([p.path for p in preds], p_te), ""))

    t, c = time.perf_counter(), time.process_time()
    scaler = StandardScaler().fit(x_tr)
    lr = LogisticRegression(max_iter=300).fit(scaler.transform(x_tr), leaf[: args.n])
    dt, dc = time.perf_counter() - t, time.process_time() - c
    pred = [leaves[i] for i in lr.predict(scaler.transform(x_te))]
    rows.append(("baseline: sklearn LogisticRegression (lbfgs, standardised, leaf classes)", dt, dc,
                 path_accuracy(pred, p_te), top_accuracy(pred, p_te), f"{lr.n_iter_[0]} iterations"))

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?", "?", "?")
    header = [
        f"# heads speed: {args.n} x {args.dim} synthetic embeddings, 4 top-level / 12 leaf classes, "
        f"{args.test} held out",
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, {args.threads} thread(s), load average at the end {load[0]:.1f} (shared machine)",
        f"heads config: {cfg.to_dict()}",
        f"command: python bench/heads_speed.py {' '.join(argv if argv is not None else sys.argv[1:])}".rstrip(),
        "",
        "| method | wall s | CPU s | held-out path accuracy | held-out top-level accuracy | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    table = header + [
        f"| {name} | {sec:.2f} | {cpu:.2f} | {pa:.3f} | {ta:.3f} | {note} |" for name, sec, cpu, pa, ta, note in rows
    ]
    text = "\n".join(table) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    return text


if __name__ == "__main__":
    main()
