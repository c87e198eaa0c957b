"""Files of the disagreement report: CSV tables and one self-contained HTML page with image thumbnails.

Input is the report dict of :func:`ml_backend.training.disagreements.build_report` (``review``, ``flags``, ``items``,
``annotators``, ``summary``); thumbnails are PNG bytes per task id, embedded as data URIs so the page
can be mailed or opened offline.
"""

from __future__ import annotations

import base64
import csv
import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["THUMB_PX", "thumbnail_png", "write_csvs", "write_html"]

THUMB_PX = 96


def thumbnail_png(image: Any, size: int = THUMB_PX) -> bytes:
    """A PNG thumbnail (longest side ``size``) of a PIL image."""
    img = image.copy()
    img.thumbnail((size, size))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def write_csvs(report: Mapping[str, Any], out_dir: Path) -> list[Path]:
    """``review.csv`` (ranked items), ``flags.csv``, ``items.csv`` and ``annotators.csv``; returns the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []

    def write(name: str, header: list[str], rows: list[list[Any]]) -> None:
        path = out_dir / name
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        files.append(path)

    write("review.csv", ["rank", "task", "score", "kinds", "level", "consensus", "quality", "excluded", "messages"], [
        [r + 1, e["item"], e["score"], ";".join(e["kinds"]), e["level"], _path(e["consensus"]), e["quality"],
         e.get("excluded") or "", " | ".join(e["messages"])]
        for r, e in enumerate(report.get("review", []))
    ])
    write("flags.csv", ["kind", "task", "level", "score", "annotator", "given", "suggested", "message", "key"], [
        [f["kind"], f["item"], f["level"], f["score"], f["annotator"] or "",
         ";".join(_path(p) for p in f["given"] or []), _path(f["suggested"]), f["message"], f["key"]]
        for f in report.get("flags", [])
    ])
    write("items.csv", ["task", "consensus", "quality", "source", "n_annotators", "agreement", "first_divergence",
                        "labels", "model_path", "model_prob"], [
        [it["item"], _path(it["consensus"]), it["quality"], it["source"], it["n_annotators"],
         "" if it["agreement_overall"] is None else it["agreement_overall"],
         "" if it["first_divergence"] is None else it["first_divergence"],
         "; ".join(f"{g['annotator']}: {'+'.join(_path(p) for p in g['paths'])}" for g in it["given"]),
         _path(it["model_path"]), "" if it["model_prob"] is None else it["model_prob"]]
        for it in report.get("items", [])
    ])
    write("annotators.csv", ["annotator", "quality", "n_labeled", "agreement_with_consensus", "worst_level",
                             "level_accuracy", "top_confusions"], [
        [a["annotator"], a["quality"], a["n_labeled"], a["agreement_with_consensus"],
         "" if a["worst_level"] is None else a["worst_level"],
         ";".join("" if x is None else f"{x:.4f}" for x in a["level_accuracy"]),
         "; ".join(f"{c['given']} -> {c['consensus']} x{c['count']}" for c in a["confusions"])]
        for a in report.get("annotators", [])
    ])
    return files


def write_html(report: Mapping[str, Any], out_path: Path, thumbnails: Mapping[int, bytes],
               task_url: str | None = None, limit: int = 200) -> Path:
    """The review page: summary, annotators, and the ranked review list with thumbnails.

    Args:
        report: the report dict.
        out_path: the ``.html`` file to write.
        thumbnails: task id -> PNG bytes (missing tasks show "no image").
        task_url: a format string with ``{task}`` linking a task in Label Studio, or None.
        limit: review entries shown at most.
    """
    e = html.escape
    s = report.get("summary", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>taxomoco disagreements</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:2em}",
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px}th{background:#f3f3f3}",
        "img{image-rendering:pixelated;width:96px}.k{font-family:monospace;font-size:12px}</style></head><body>",
        f"<h1>Disagreements of project {e(str(report.get('project', '')))}</h1>",
        f"<p>Model version {e(str(report.get('model_version') or 'none'))}; {s.get('items', 0)} tasks, "
        f"{s.get('trained', 0)} used for training, {s.get('excluded', 0)} excluded, {s.get('annotators', 0)} annotators, "
        f"{s.get('items_with_disagreement', 0)} tasks with a disagreement; flags: "
        f"{e(', '.join(f'{k} {v}' for k, v in (s.get('flags') or {}).items()) or 'none')}.</p>",
        _blend_note(s.get("quality_blend") or []),
        "<h2>Annotators</h2><table><tr><th>annotator</th><th>quality</th><th>labelled</th>"
        "<th>agreement with consensus</th><th>worst level</th><th>most frequent disagreements</th></tr>",
    ]
    for a in report.get("annotators", []):
        conf = "<br>".join(e(f"{c['given']} → {c['consensus']} ×{c['count']}") for c in a["confusions"])
        parts.append(
            f"<tr><td>{e(str(a['annotator']))}</td><td>{a['quality']:.3f}</td><td>{a['n_labeled']}</td>"
            f"<td>{a['agreement_with_consensus']:.3f}</td><td>{'' if a['worst_level'] is None else a['worst_level']}</td>"
            f"<td>{conf}</td></tr>"
        )
    parts.append("</table><h2>Review list (most urgent first)</h2><table><tr><th>#</th><th>image</th><th>task</th>"
                 "<th>score</th><th>flags</th><th>consensus</th><th>labels given</th><th>why</th></tr>")
    items = {it["item"]: it for it in report.get("items", [])}
    for rank, entry in enumerate(report.get("review", [])[:limit], start=1):
        task = entry["item"]
        png = thumbnails.get(task)
        img = (f"<img alt='task {task}' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
               if png else "no image")
        link = e(str(task)) if not task_url else f"<a href='{e(task_url.format(task=task))}'>{task}</a>"
        given = "<br>".join(
            e(f"{g['annotator']}: {' + '.join(_path(p) for p in g['paths'])} (p={g['quality']:.2f})")
            for g in items.get(task, {}).get("given", [])
        )
        excluded = f"<br><i>excluded: {e(entry['excluded'])}</i>" if entry.get("excluded") else ""
        parts.append(
            f"<tr><td>{rank}</td><td>{img}</td><td>{link}</td><td>{entry['score']:.3f}</td>"
            f"<td class='k'>{'<br>'.join(e(k) for k in entry['kinds'])}</td>"
            f"<td>{e(_path(entry['consensus']))} (p={entry['quality']:.2f})</td><td>{given}</td>"
            f"<td>{'<br>'.join(e(m) for m in entry['messages'])}{excluded}</td></tr>"
        )
    parts.append("</table>")
    if report.get("problems"):
        parts.append("<h2>Input problems</h2><ul>" + "".join(f"<li>{e(p)}</li>" for p in report["problems"][:200]) + "</ul>")
    parts.append("</body></html>")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text("\n".join(parts), encoding="utf-8")
    return out_path


def _blend_note(blend: list[float]) -> str:
    """One line on how the qualities (p=...) were estimated, per level (empty for reports without it)."""
    if not blend:
        return ""
    levels = ", ".join(f"level {k}: {b:.2f}" for k, b in enumerate(blend))
    return ("<p>Qualities (p=…) blend the Dawid–Skene estimate with a weighted average of the model and the "
            f"annotators, chosen on held-out labels ({levels}; 1.00 = annotators' mistakes look independent, lower = "
            "annotators and the model tend to err together, so agreement counts for less).</p>")


def _path(path: Any) -> str:
    return "/".join(path) if path else ""
