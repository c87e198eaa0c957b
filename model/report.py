"""An evaluation report on disk: ``report.json``, PNG plots and one self-contained ``report.html``.

The summary names the model choice of the training (``metrics["model_choice"]``: every candidate's cross-validated
hierarchical F1 and why the winner won) when the metrics carry one. Plots (matplotlib, Agg backend): a confusion
matrix per taxonomy level, the reliability diagram of the path confidence, the pretraining loss curve (``loss.csv``
with ``epoch,step,loss`` columns) and the accuracy-versus-number-of-labels curve, each only when its data is given.
The HTML embeds the images as data URIs, so the single file can be mailed or attached to a ticket.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from model.errors import DataError
from model.taxonomy import Taxonomy

__all__ = [
    "curve_points",
    "plot_confusion",
    "plot_label_curve",
    "plot_loss",
    "plot_reliability",
    "read_loss_csv",
    "write_report",
]

_MAX_TICKS = 40  # above this many classes, confusion matrices drop their tick labels


def _pyplot() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(level: Mapping[str, Any], path: Path) -> Path:
    """Row-normalised confusion matrix of one level (``level_metrics`` output) into ``path``."""
    plt = _pyplot()
    cm = np.asarray(level["confusion"], dtype=np.float64)  # (K, K) rows true, columns predicted
    names = list(level["classes"])
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(names)
    size = min(4 + 0.35 * k, 16)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if k <= _MAX_TICKS:
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        if k <= 15:
            for i in range(k):
                for j in range(k):
                    if cm[i, j]:
                        ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(
        f"level {level.get('level', '?')}: accuracy {level['accuracy']:.3f}, macro F1 {level['macro']['f1']:.3f}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_reliability(cal: Mapping[str, Any], path: Path) -> Path:
    """Reliability diagram (accuracy per confidence bin against the diagonal) into ``path``."""
    plt = _pyplot()
    bins = [b for b in cal["bins"] if b["count"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    if bins:
        centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
        width = bins[0]["hi"] - bins[0]["lo"]
        ax.bar(centres, [b["accuracy"] for b in bins], width=width * 0.9, alpha=0.7, label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", color="C1",
                label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("path confidence")
    ax.set_ylabel("fraction correct")
    ax.set_title(f"reliability (ECE {cal['ece']:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_loss_csv(loss_csv: Path) -> tuple[list[int], list[float]]:
    """Steps and losses of a pretraining ``loss.csv`` (columns ``epoch,step,loss``)."""
    steps, losses = [], []
    with open(loss_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"step", "loss"} <= set(reader.fieldnames):
            raise DataError(f"{loss_csv} has columns {reader.fieldnames}; expected epoch,step,loss.")
        for i, row in enumerate(reader):
            steps.append(int(row["step"]) if row["step"] else i)
            losses.append(float(row["loss"]))
    return steps, losses


def plot_loss(loss_csv: Path, path: Path) -> Path:
    """Pretraining loss per step (and a moving average) into ``path``."""
    plt = _pyplot()
    steps, losses = read_loss_csv(loss_csv)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, lw=0.7, alpha=0.5, label="step")
    if len(losses) >= 5:
        w = max(len(losses) // 20, 2)
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(steps[w - 1 :], smooth, lw=1.5, label=f"mean of {w}")
    ax.set_xlabel("step")
    ax.set_ylabel("contrastive loss")
    ax.set_title("self-supervised pretraining")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def curve_points(label_curve: Sequence[tuple[int, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """``(n_labels, metrics)`` pairs reduced to path accuracy, top-level macro F1 and hF per point."""
    points = []
    for n, m in sorted(label_curve, key=lambda p: p[0]):
        levels = m.get("levels") or [{}]
        points.append({
            "n_labels": int(n),
            "path_accuracy": m.get("path_accuracy"),
            "level0_macro_f1": levels[0].get("macro", {}).get("f1"),
            "hF": m.get("hierarchical", {}).get("hF"),
        })
    return points


def plot_label_curve(points: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Accuracy against the number of labelled images into ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p["n_labels"] for p in points]
    for key, label in (("path_accuracy", "path accuracy"), ("level0_macro_f1", "top-level macro F1"), ("hF", "hF")):
        ys = [p[key] for p in points]
        if all(y is not None for y in ys):
            ax.plot(xs, ys, "o-", label=label)
    if xs and min(xs) > 0:
        ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("labelled images")
    ax.set_ylabel("score")
    ax.set_title("accuracy vs. number of labels")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else html.escape(str(x))


def _choice_html(choice: Mapping[str, Any] | None) -> list[str]:
    """The model choice (``model.heads.selection.Selection.to_dict()``): winner, reason, every candidate's score."""
    if not choice or "candidates" not in choice:
        return []
    rows = [f"<h3>model choice: {html.escape(str(choice.get('chosen')))}</h3>",
            f"<p>{html.escape(str(choice.get('reason', '')))}</p>",
            "<table><tr><th>candidate</th><th>hF (mean over folds)</th><th>± std</th><th>path accuracy</th>"
            "<th>seconds</th></tr>"]
    for name, c in choice["candidates"].items():
        mark = " (chosen)" if name == choice.get("chosen") else ""
        rows.append(f"<tr><td>{html.escape(name + mark)}</td><td>{_fmt(c['hF_mean'])}</td><td>{_fmt(c['hF_std'])}</td>"
                    f"<td>{_fmt(c['path_accuracy'])}</td><td>{_fmt(c['seconds'])}</td></tr>")
    rows += [f"<tr><td>{html.escape(name)}</td><td colspan=4>not run: {html.escape(str(why))}</td></tr>"
             for name, why in (choice.get("skipped") or {}).items()]
    rows.append("</table>")
    return rows


def _html(metrics: Mapping[str, Any], images: Sequence[tuple[str, Path]], points: Sequence[Mapping[str, Any]] | None) -> str:
    rows = []
    summary = [
        ("labelled images", metrics.get("n", metrics.get("n_labelled", ""))),
        ("path accuracy", metrics.get("path_accuracy", "")),
        ("hP / hR / hF", " / ".join(_fmt(metrics.get("hierarchical", {}).get(k, "")) for k in ("hP", "hR", "hF"))),
        ("ECE (calibrated)", metrics.get("calibration", {}).get("ece", "")),
        ("ECE (uncalibrated)", metrics.get("ece_uncalibrated", "")),
        ("temperature", metrics.get("temperature", "")),
        ("NLL", metrics.get("nll", "")),
        ("folds", metrics.get("folds", "")),
    ]
    rows.append("<table><tr><th colspan=2>summary</th></tr>")
    rows += [f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>" for k, v in summary if v != ""]
    rows.append("</table>")
    rows += _choice_html(metrics.get("model_choice"))
    for lv in metrics.get("levels", []):
        rows.append(
            f"<h3>level {lv.get('level')}: accuracy {_fmt(lv['accuracy'])}, macro P/R/F1 "
            f"{_fmt(lv['macro']['precision'])} / {_fmt(lv['macro']['recall'])} / {_fmt(lv['macro']['f1'])} "
            f"(n = {lv['n']})</h3>"
        )
        rows.append("<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>")
        for name, c in lv["per_class"].items():
            rows.append(
                f"<tr><td>{html.escape(name)}</td><td>{_fmt(c['precision'])}</td><td>{_fmt(c['recall'])}</td>"
                f"<td>{_fmt(c['f1'])}</td><td>{c['support']}</td></tr>"
            )
        rows.append("</table>")
    if points:
        rows.append("<h3>accuracy vs. number of labels</h3><table><tr><th>labels</th><th>path accuracy</th>"
                    "<th>top-level macro F1</th><th>hF</th></tr>")
        rows += [f"<tr><td>{p['n_labels']}</td><td>{_fmt(p['path_accuracy'])}</td><td>{_fmt(p['level0_macro_f1'])}"
                 f"</td><td>{_fmt(p['hF'])}</td></tr>" for p in points]
        rows.append("</table>")
    for title, png in images:
        data = base64.b64encode(png.read_bytes()).decode()
        rows.append(f'<h3>{html.escape(title)}</h3><img alt="{html.escape(title)}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>taxomoco evaluation</title>"
            f"<style>{style}</style></head><body><h1>taxomoco evaluation</h1>{''.join(rows)}</body></html>")


def write_report(
    out_dir: Path | str,
    metrics: Mapping[str, Any],
    taxonomy: Taxonomy,
    loss_csv: Path | None = None,
    label_curve: Sequence[tuple[int, Mapping[str, Any]]] | None = None,
) -> Path:
    """Write ``report.json``, the PNG plots and ``report.html`` into ``out_dir``.

    Args:
        out_dir: destination directory (created).
        metrics: ``model.evaluation.evaluate`` output (plus anything JSON-able).
        taxonomy: the label tree (stored in the JSON).
        loss_csv: a pretraining ``loss.csv`` to plot, or None.
        label_curve: ``(number of labelled images, metrics)`` pairs for the learning curve, or None.

    Returns:
        The path of ``report.html``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, Path]] = []
    for lv in metrics.get("levels", []):
        k = lv.get("level", len(images))
        images.append((f"confusion matrix, level {k}", plot_confusion(lv, out / f"confusion_level{k}.png")))
    if "calibration" in metrics:
        images.append(("reliability diagram", plot_reliability(metrics["calibration"], out / "reliability.png")))
    if loss_csv is not None:
        images.append(("pretraining loss", plot_loss(Path(loss_csv), out / "pretrain_loss.png")))
    points = curve_points(label_curve) if label_curve else None
    if points:
        images.append(("accuracy vs. number of labels", plot_label_curve(points, out / "label_curve.png")))
    report = {
        "metrics": metrics,
        "taxonomy": taxonomy.to_json(),
        "taxonomy_hash": taxonomy.hash(),
        "label_curve": points,
        "images": [p.name for _, p in images],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(metrics, images, points), encoding="utf-8")
    return page
