"""The report of ``bench/ssl_vs_baseline.py``: tables per dataset, verdicts and goals, the figure, the machine."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path as FsPath

import numpy as np
import torch

from bench.datasets import ANIMAL_TAXONOMY
from bench.shapes import SHAPES_TAXONOMY
from bench.ssl_protocol import verdict
from ml_backend.settings import Settings

__all__ = ["METHODS", "changed_settings", "combine", "machine", "report_text", "write_results"]

ROOT = FsPath(__file__).resolve().parents[1]
TAXONOMIES = {"animal-mnist": ANIMAL_TAXONOMY, "shapes": SHAPES_TAXONOMY}
METHODS = ("ours", "pixels+logreg", "pixels+knn", "random-init+heads", "supervised-cnn")


def changed_settings(settings: Settings) -> dict[str, str]:
    """Every public setting whose value differs from its default, by env var (PRETRAIN_SEED is per seed)."""
    out = {}
    for f in dataclasses.fields(Settings):
        if f.name != "pretrain_seed" and getattr(settings, f.name) != f.default:
            out[f.metadata["env"]] = str(getattr(settings, f.name))
    return out


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in FsPath("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "python": platform.python_version(), "torch": torch.__version__, "load_average": os.getloadavg(),
            "date": time.strftime("%Y-%m-%d %H:%M %Z"), "commit": commit, "command": " ".join(sys.argv)}


def chance_hf(dataset: str) -> float:
    """Expected hF of a uniformly random leaf on a test split with equally many images per leaf (both datasets)."""
    tax = TAXONOMIES[dataset]
    leaves = [n.path for n in tax.leaves()]
    share = [np.mean([sum(q[: k + 1] == p[: k + 1] for q in leaves) / len(leaves) for k in range(len(p))])
             for p in leaves]
    return float(np.mean(share))


def _stats(rows: list[dict], method: str, budget: str, metric: str) -> list[float]:
    return [r[metric] for r in sorted(rows, key=lambda r: r["seed"]) if r["method"] == method and r["budget"] == budget]


def dataset_tables(res: dict) -> tuple[list[str], list[dict]]:
    """Markdown tables (hF with verdict, leaf macro-F1) of one dataset, and the verdicts."""
    rows = res["rows"]
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    budgets = list(dict.fromkeys(r["budget"] for r in rows))
    baselines = [m for m in methods if m != "ours"]
    verdicts = []
    lines = []
    for metric, title in (("hF", "hierarchical F1"), ("leaf_f1", "leaf macro-F1")):
        extra = " best baseline | ours − best | verdict |" if metric == "hF" else ""
        lines += [f"{title}, mean ± std over seeds:", "",
                  "| budget | labels | " + " | ".join(methods) + " |" + extra,
                  "|---|---|" + "---|" * len(methods) + ("---|---|---|" if extra else "")]
        for b in budgets:
            labels = next(r["labelled"] for r in rows if r["budget"] == b)
            same = next((r.get("same_subset_as") for r in rows if r["budget"] == b), None)
            cells = []
            for m in methods:
                v = _stats(rows, m, b, metric)
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "–")
            line = f"| {b}{f' (= {same})' if same else ''} | {labels} | " + " | ".join(cells) + " |"
            if extra and "ours" in methods and baselines:
                best = max(baselines, key=lambda m: np.mean(_stats(rows, m, b, metric)))
                word, diff, margin = verdict(_stats(rows, "ours", b, metric), _stats(rows, best, b, metric))
                verdicts.append({"dataset": res["dataset"], "budget": b, "best_baseline": best, "diff": diff,
                                 "margin": margin, "verdict": word})
                line += f" {best} | {diff:+.3f} (±{margin:.3f}) | **{word}** |"
            lines.append(line)
        lines.append("")
    if "ours" in methods:
        lines.append("ours' model choice (product cross-validation), per budget over seeds: " + "; ".join(
            f"{b}: " + ", ".join(f"{c} ×{n}" for c, n in sorted(
                {c: sum(1 for r in rows if r["method"] == "ours" and r["budget"] == b and r["choice"]["chosen"] == c)
                 for c in {r["choice"]["chosen"] for r in rows if r["method"] == "ours" and r["budget"] == b}}.items()))
            for b in budgets))
        lines.append("")
    return lines, verdicts


def report_text(results: dict) -> str:
    lines = ["# The product on its defaults vs baselines with few labels (bench/ssl_vs_baseline.py)", "",
             f"public settings changed from their defaults: {results['settings_changed'] or 'none'}; "
             f"PRETRAIN_SEED = the seed ({results['seeds']}).",
             f"machine: {json.dumps(results['machine'])}", ""]
    all_verdicts = []
    for res in results["datasets"]:
        seeds = sorted({r["seed"] for r in res["rows"]})
        lines += [f"## {res['dataset']}: {res['n_images']} images, levels {res['levels']} classes; test "
                  f"{res['split']['test']}, validation {res['split']['validation']}, pool {res['split']['pool']}; "
                  f"seeds {seeds}; hF of a random leaf (chance) {chance_hf(res['dataset']):.3f}", ""]
        for seed, pre in sorted(res["pretraining"].items()):
            if pre.get("pretrained"):
                plan = pre["plan"]
                lines.append(f"- seed {seed}: pretrained {pre['images']} images at {pre['input_size']} px, "
                             f"{pre['steps_done']}/{plan['steps']} steps ({plan['limited_by']}), {pre['wall_seconds']:.0f} s "
                             f"wall, {pre['images_per_second']:.0f} img/s, final epoch loss {pre['final_epoch_loss']}, "
                             f"view retrieval {pre['view_retrieval']}, learned: {pre['learned']}")
            else:
                lines.append(f"- seed {seed}: not pretrained ({pre['images']} images < PRETRAIN_MIN_IMAGES): the "
                             "initial encoder, as the product does")
        lines.append("")
        tables, verdicts = dataset_tables(res)
        lines += tables
        all_verdicts += verdicts
    if all_verdicts:
        misses = [v for v in all_verdicts if v["verdict"] != "win"]
        lines.append("Goal 1 (ours ≥ the best baseline at every budget): " + (
            "met" if all(v["verdict"] != "miss" for v in all_verdicts) else "MISSED") + "; not a clear win at: "
            + (", ".join(f"{v['dataset']} {v['budget']} ({v['verdict']}, {v['diff']:+.3f} vs {v['best_baseline']})"
                         for v in misses) or "none"))
        few = [v for v in all_verdicts if v["dataset"] == "animal-mnist" and v["budget"] in ("1/class", "2/class", "5/class")]
        if few:
            lines.append("Goal 2 (≥ +0.05 hF over the best baseline at 1-5 labels per class on animal-mnist): " + (
                "met" if all(v["diff"] >= 0.05 for v in few) else "MISSED") + " (" + ", ".join(
                f"{v['budget']} {v['diff']:+.3f}" for v in few) + ")")
    return "\n".join(lines) + "\n"


def plot(results: dict, png: FsPath) -> None:
    """hF against the number of labels, one panel per dataset, mean ± std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional heavy import, only for the figure
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(results["datasets"]), 4.2), dpi=110)
    FigureCanvasAgg(fig)
    for i, res in enumerate(results["datasets"]):
        ax = fig.add_subplot(1, len(results["datasets"]), i + 1)
        rows = [r for r in res["rows"] if "same_subset_as" not in r]
        for m in METHODS:
            pts = sorted({(r["labelled"], r["budget"]) for r in rows if r["method"] == m})
            if not pts:
                continue
            mean = [np.mean(_stats(rows, m, b, "hF")) for _, b in pts]
            std = [np.std(_stats(rows, m, b, "hF")) for _, b in pts]
            ax.errorbar([n for n, _ in pts], mean, yerr=std, marker="o", capsize=3, label=m,
                        linewidth=2.5 if m == "ours" else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("labelled images")
        ax.set_ylabel("hierarchical F1 on the test split")
        ax.set_title(res["dataset"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png)


def write_results(results: dict, dest: FsPath) -> None:
    text = report_text(results)
    print(text, flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.with_suffix(".txt").write_text(text)
    dest.with_suffix(".json").write_text(json.dumps(results, indent=1))
    plot(results, dest.with_suffix(".png"))
    print(f"wrote {dest}.txt/.json/.png", flush=True)


def combine(parts: Sequence[dict]) -> dict:
    """One report from runs of the same settings (e.g. one process per dataset)."""
    first = parts[0]
    for p in parts[1:]:
        if p["settings_changed"] != first["settings_changed"]:
            raise SystemExit("the result files were made with different settings; rerun them with the same ones")
    return {**first, "datasets": [d for p in parts for d in p["datasets"]],
            "machine": [p["machine"] for p in parts] if len(parts) > 1 else first["machine"]}


