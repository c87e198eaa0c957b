"""A retraining's logistic-regression heads started from the live heads vs from zero (``model.heads.linear``).

What it compares: the ``pixels+linear`` candidate's final fit (``Candidate.train``, the product's pixel features and
solver settings) on the labels of a retraining, started from the heads of the version before (``init``: what
``ml_backend.training.fit.live_start`` passes) vs from zero (what every fit did before). Data: animal-mnist (2-level
taxonomy, real images through ``PixelFeatures``); the version before was fitted on ``n`` labels, the retraining
has ``n + new`` (the next images of a random order) with ``changed`` of the ``n`` old labels switched to another
animal (a labeler's correction). Rounds draw other orders.

For each it reports the wall and CPU seconds of the fit, the solver iterations (the sum over levels), and how far
each solution is from the exact optimum (the same fit with ``tol=1e-10``, ``max_iter=5000``): mean and max absolute
difference of the predicted class probabilities on all 10,000 images, and the share of images whose predicted
class differs, per level. The penalised problem has one optimum; the start may change only the solver's time.

Usage:
    python bench/linear_warm_start.py [--sizes 300 1000 2300] [--new 10 30] [--changed 5] [--rounds 5]
        [--threads 1] [--out bench/results/linear_warm_start.txt]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: run from anywhere

from bench.datasets import load_animal_mnist  # noqa: E402
from bench.provenance import header, load_line, write_result  # noqa: E402
from model.features.pixels import PixelFeatures  # noqa: E402
from model.heads.candidates import CANDIDATES  # noqa: E402
from model.heads.heads import TaxonomyHeads  # noqa: E402
from model.taxonomy import Taxonomy  # noqa: E402

ITERATIONS: list[int] = []
_FIT = LogisticRegression.fit


def _counted_fit(self: LogisticRegression, *args: object, **kwargs: object) -> LogisticRegression:
    out = _FIT(self, *args, **kwargs)
    ITERATIONS.append(int(np.max(self.n_iter_)))
    return out


def probabilities(heads: TaxonomyHeads, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        return [torch.softmax(out, 1).numpy() for out in heads(x)]


def timed_fit(x: np.ndarray, y: np.ndarray, num_classes: list[int], init: TaxonomyHeads | None
              ) -> tuple[TaxonomyHeads, float, float, int]:
    ITERATIONS.clear()
    wall, cpu = time.perf_counter(), time.process_time()
    heads = CANDIDATES["pixels+linear"].train(x, y, num_classes, init=init)
    return heads, time.perf_counter() - wall, time.process_time() - cpu, sum(ITERATIONS)


def exact_fit(x: np.ndarray, y: np.ndarray, num_classes: list[int]) -> TaxonomyHeads:
    import sklearn.linear_model as linear_model

    plain = linear_model.LogisticRegression

    def tight(**kwargs: object) -> LogisticRegression:
        return plain(**{**kwargs, "tol": 1e-10, "max_iter": 5000})

    linear_model.LogisticRegression = tight  # type: ignore[misc,assignment]  # model.heads.linear imports it per call
    try:
        return CANDIDATES["pixels+linear"].train(x, y, num_classes)
    finally:
        linear_model.LogisticRegression = plain  # type: ignore[misc]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 2300])
    parser.add_argument("--new", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--changed", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/linear_warm_start.txt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    LogisticRegression.fit = _counted_fit  # type: ignore[method-assign]
    head = header("Logistic-regression heads of a retraining: started from the live heads vs from zero "
                  "(bench/linear_warm_start.py)")  # date, command, machine and the load at the start

    images, paths = load_animal_mnist()
    features = PixelFeatures()
    x_all = features.embed([Image.fromarray(im).convert("RGB") for im in images])  # (10000, D)
    taxonomy = Taxonomy.from_paths(paths)
    y_all = taxonomy.encode_many(paths)  # (10000, 2)
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    x_eval = torch.from_numpy(x_all).float()

    rows = []
    for n in args.sizes:
        for new in args.new:
            for r in range(args.rounds):
                rng = np.random.default_rng(1000 * n + 10 * new + r)
                order = rng.permutation(len(x_all))
                before, now = order[:n], order[: n + new]
                live = CANDIDATES["pixels+linear"].train(x_all[before], y_all[before], num_classes)
                y_now = y_all[now].copy()
                switch = rng.choice(n, min(args.changed, n), replace=False)
                leaves = taxonomy.encode_many([leaf.path for leaf in taxonomy.leaves()])  # (K, 2)
                y_now[switch] = leaves[rng.integers(0, len(leaves), len(switch))]
                x_now = x_all[now]
                exact = probabilities(exact_fit(x_now, y_now, num_classes), x_eval)
                for start, init in (("zero", None), ("live heads", live)):
                    heads, wall, cpu, its = timed_fit(x_now, y_now, num_classes, init)
                    got = probabilities(heads, x_eval)
                    diff = [np.abs(g - e) for g, e in zip(got, exact)]
                    flips = [float((g.argmax(1) != e.argmax(1)).mean()) for g, e in zip(got, exact)]
                    rows.append({"n": n, "new": new, "round": r, "start": start, "wall": wall, "cpu": cpu,
                                 "iterations": its, "mean_dp": float(np.mean([d.mean() for d in diff])),
                                 "max_dp": float(max(d.max() for d in diff)), "flips": max(flips)})
                print(f"n={n} +{new} round {r}: " + ", ".join(
                    f"{row['start']} {row['wall']:.2f}s {row['iterations']} it" for row in rows[-2:]), flush=True)

    def spread(values: list[float], fmt: str) -> str:
        return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}}"

    lines = head + [
        f"Threads: {args.threads}. Data: animal-mnist, 10,000 images, pixel features (D = {x_all.shape[1]}), "
        f"classes per level {num_classes}; "
        f"the version before on n labels, the retraining on n + new with {args.changed} old labels changed; "
        f"{args.rounds} rounds (label orders) each; product defaults (C = 1, max_iter = 300, tol = 1e-4).",
        "",
        "| labels before | new | start | fit wall s | fit CPU s | solver iterations | mean abs Δp to the exact "
        "optimum | max abs Δp | predicted class differs from the optimum's (worst level) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in args.sizes:
        for new in args.new:
            for start in ("zero", "live heads"):
                sel = [row for row in rows if row["n"] == n and row["new"] == new and row["start"] == start]
                lines.append(
                    f"| {n} | {new} | {start} | {spread([s['wall'] for s in sel], '.2f')} | "
                    f"{spread([s['cpu'] for s in sel], '.2f')} | {spread([s['iterations'] for s in sel], '.0f')} | "
                    f"{spread([s['mean_dp'] for s in sel], '.5f')} | {max(s['max_dp'] for s in sel):.3f} | "
                    f"{100 * max(s['flips'] for s in sel):.2f} % |")
    lines.append("")
    for n in args.sizes:
        for new in args.new:
            zero = [row for row in rows if row["n"] == n and row["new"] == new and row["start"] == "zero"]
            live = [row for row in rows if row["n"] == n and row["new"] == new and row["start"] == "live heads"]
            ratio = [b["wall"] / a["wall"] for a, b in zip(zero, live)]
            lines.append(f"- {n} + {new} labels: live-start / zero-start wall per round "
                         f"{', '.join(f'{v:.2f}' for v in ratio)} (mean {np.mean(ratio):.2f})")
    lines += ["", load_line("at the end"), ""]
    write_result(args.out, "\n".join(lines))


if __name__ == "__main__":
    main()
