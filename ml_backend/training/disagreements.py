"""Annotator disagreements of a Label Studio project: read annotations, save and serve the report, post flags.

Flow: the training job pulls every task with all annotations (``ls_client.iter_tasks``), turns them into
:class:`model.crowd.consensus.Annotation` with :func:`annotations_from_tasks`, trains on the consensus labels,
then calls :func:`save_report` with the consensus computed from the model's out-of-sample probabilities.
``GET /disagreements?project=ID`` answers :func:`load_report`; ``taxomoco disagreements --project ID``
runs :func:`run_cli` (JSON, CSV and an HTML page with thumbnails); :func:`post_flags` shows the flags in
Label Studio: one Data Manager tab per flag kind in every edition (Community has no comment API), and one
comment per flagged task where the server has comments (Enterprise), never posting the same flag twice.

Which annotations count:
    * cancelled (``was_cancelled``) annotations give no label;
    * ``ground_truth: true`` annotations, then reviewed ones (an accepted review in ``review_result`` /
      ``reviews`` / ``reviewed``, as Label Studio Enterprise reports them) take precedence;
    * the annotator is ``completed_by`` (an id, or a dict with ``id`` / ``email``);
    * labels no longer in the label config are reported as problems and left out.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ml_backend.labelstudio.label_config import LabelConfig
from ml_backend.labelstudio.results import parse_annotation
from model.crowd.consensus import Annotation, ConsensusResult
from model.errors import DataError

log = logging.getLogger(__name__)

REPORT_DIR = "disagreements"
REPORT_FILE = "report.json"


def _annotator_of(ann: Mapping[str, Any]) -> str:
    who = ann.get("completed_by")
    if isinstance(who, Mapping):
        who = who.get("id", who.get("email"))
    if who is None:
        who = ann.get("created_username") or "unknown"
    return str(who)


def _is_reviewed(ann: Mapping[str, Any]) -> bool:
    if ann.get("reviewed") is True:
        return True
    if str(ann.get("review_result") or "").lower() in ("accepted", "approved"):
        return True
    reviews = ann.get("reviews")
    if isinstance(reviews, Sequence) and not isinstance(reviews, str):
        return any(isinstance(r, Mapping) and r.get("accepted") is True for r in reviews)
    return False


def annotations_from_tasks(tasks: Iterable[Any], config: LabelConfig) -> tuple[list[Annotation], list[str]]:
    """The annotations of every task, one :class:`Annotation` per Label Studio annotation.

    Args:
        tasks: ``ls_client.TaskRecord`` objects (``id``, ``data``, ``annotations`` as Label Studio returns
            them) or plain task dicts with the same keys.
        config: the project's parsed label config.

    Returns:
        annotations: one per annotation; cancelled or empty ones have no paths (their task stays known and
            is reported as excluded when nothing else labels it).
        problems: one message per label that could not be used (unknown path, missing annotator ...).
    """
    out: list[Annotation] = []
    problems: list[str] = []
    for task in tasks:
        task_id = task["id"] if isinstance(task, Mapping) else task.id
        anns = task.get("annotations", []) if isinstance(task, Mapping) else task.annotations
        for ann in anns or []:
            if not isinstance(ann, Mapping):
                problems.append(f"task {task_id}: an annotation is not an object ({type(ann).__name__}); skipped.")
                continue
            annotator = _annotator_of(ann)
            if ann.get("was_cancelled"):
                out.append(Annotation(int(task_id), annotator, ()))
                continue
            parsed = parse_annotation(ann.get("result"), config)
            for path, reason in parsed.unknown:
                problems.append(f"task {task_id}, annotation {ann.get('id')} by {annotator}: {reason}")
            out.append(Annotation(
                item=int(task_id), annotator=annotator, paths=tuple(tuple(p) for p in parsed.paths),
                ground_truth=bool(ann.get("ground_truth")), reviewed=_is_reviewed(ann),
            ))
    return out, problems


# ----- the saved report -----------------------------------------------------------------------------------
def report_path(settings: Any, project_id: int) -> Path:
    """Where the training job saves a project's report: ``project_dir/disagreements/report.json``."""
    return Path(settings.project_dir(project_id)) / REPORT_DIR / REPORT_FILE


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_report(
    result: ConsensusResult, project_id: int, model_version: str | None = None, problems: Sequence[str] = ()
) -> dict:
    """The report dict: the consensus result's JSON plus project, model version and input problems."""
    data = result.to_json()
    data["project"] = int(project_id)
    data["model_version"] = model_version
    data["problems"] = list(problems) + data.get("problems", [])
    return data


def save_report(
    settings: Any, project_id: int, result: ConsensusResult, model_version: str | None = None,
    problems: Sequence[str] = (),
) -> Path:
    """Save the report where :func:`load_report` finds it (atomically), with the model's probabilities
    (so that ``taxomoco disagreements`` can recompute with the model's opinion later). Returns the file."""
    path = report_path(settings, project_id)
    if result.level_probs:
        save_model_probs(path.parent / MODEL_PROBS_FILE, result.level_probs)
    _write_atomic(path, json.dumps(build_report(result, project_id, model_version, problems), indent=1))
    return path


def load_report(settings: Any, project_id: int) -> dict:
    """The last saved report of a project (``GET /disagreements?project=ID``).

    Raises:
        DataError: no report yet (no training has finished), naming how to make one.
    """
    path = report_path(settings, project_id)
    if not path.is_file():
        raise DataError(
            f"No disagreement report for project {project_id} yet ({path} is missing): it is written after each "
            "training. Train the project (Train button in Label Studio) or run `taxomoco disagreements --project "
            f"{project_id}`."
        )
    return json.loads(path.read_text(encoding="utf-8"))


# ----- the model's opinion, kept for later runs -------------------------------------------------------------
MODEL_PROBS_FILE = "model_probs.npz"


def save_model_probs(path: Path, level_probs: Mapping[int, Sequence[Any]]) -> None:
    """Store item -> per-level probability vectors as ``items`` ``(N,)`` and ``level_<k>`` ``(N, K_k)``."""
    import numpy as np

    items = sorted(int(i) for i in level_probs)
    if not items:
        return
    depth = len(level_probs[items[0]])
    arrays = {"items": np.asarray(items, dtype=np.int64)}
    for k in range(depth):
        arrays[f"level_{k}"] = np.stack([np.asarray(level_probs[i][k], dtype=np.float32) for i in items])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_model_probs(path: Path) -> dict[int, list[Any]] | None:
    """What :func:`save_model_probs` stored, or None when there is no file."""
    import numpy as np

    if not path.is_file():
        return None
    with np.load(path) as data:
        items = data["items"].tolist()
        levels = [data[f"level_{k}"] for k in range(len([n for n in data.files if n.startswith("level_")]))]
    return {int(item): [level[row] for level in levels] for row, item in enumerate(items)}


# ----- flags in Label Studio ----------------------------------------------------------------------------------
POSTED_FILE = "posted.json"
MARKER = "taxomoco-flag"
TAB_TITLES = {
    "label_error_candidate": "taxomoco: label-error candidates",
    "low_quality_consensus": "taxomoco: uncertain consensus",
    "annotators_disagree": "taxomoco: annotators disagree",
}
MAX_TAB_TASKS = 300
MAX_COMMENTS = 200


def comment_text(flags: Sequence[Any]) -> str:
    """One comment for the new flags of one task; each flag's key is written as ``[taxomoco-flag <key>]``."""
    lines = [f"taxomoco: {f.message}" for f in flags]
    lines += [f"[{MARKER} {f.key}]" for f in flags]
    return "\n".join(lines)


def _keys_in(texts: Iterable[str]) -> set[str]:
    keys = set()
    for text in texts:
        for line in str(text or "").splitlines():
            line = line.strip()
            if line.startswith(f"[{MARKER} ") and line.endswith("]"):
                keys.add(line[len(MARKER) + 2:-1])
    return keys


def post_flags(settings: Any, client: Any, project_id: int, result: ConsensusResult,
               max_comments: int = MAX_COMMENTS, min_score: float = 0.1) -> dict:
    """Show the flags in Label Studio: one Data Manager tab per flag kind (every edition) and, where the
    server has comments (Enterprise), one comment per task carrying its new flags. A flag already posted
    (its key is in a comment of the task, or in ``disagreements/posted.json``) is never posted again.

    Args:
        settings: the process settings (where ``posted.json`` lives).
        client: a ``ml_backend.labelstudio.client.LabelStudioClient``.
        project_id: the Label Studio project.
        result: the consensus with its flags (most urgent first).
        max_comments: tasks commented at most per call (the most urgent first; the rest on later runs).
        min_score: flags below this score go to the tabs only ("annotators disagree" on a clear consensus).

    Returns:
        ``{"tabs": {title: tab id}, "comments_supported": bool, "comments_posted": n, "flags_already_posted": m}``.
    """
    summary: dict[str, Any] = {"tabs": {}, "comments_supported": False, "comments_posted": 0, "flags_already_posted": 0}
    for kind, title in TAB_TITLES.items():
        ids: list[int] = []
        for f in result.flags:
            if f.kind.value == kind and f.item not in ids:
                ids.append(f.item)
        summary["tabs"][title] = client.upsert_task_tab(project_id, title, ids[:MAX_TAB_TASKS])
    if not client.supports_comments():
        return summary
    summary["comments_supported"] = True
    posted_path = report_path(settings, project_id).parent / POSTED_FILE
    posted: set[str] = set(json.loads(posted_path.read_text())) if posted_path.is_file() else set()
    by_item: dict[int, list[Any]] = {}
    for f in result.flags:  # most urgent first
        if f.score >= min_score or f.kind.value != "annotators_disagree":
            by_item.setdefault(f.item, []).append(f)
    done = 0
    try:
        for item, flags in by_item.items():
            new = [f for f in flags if f.key not in posted]
            summary["flags_already_posted"] += len(flags) - len(new)
            if not new:
                continue
            if done >= max_comments:
                break
            there = _keys_in(c.get("text", "") for c in client.list_comments(item))
            posted |= there & {f.key for f in new}
            summary["flags_already_posted"] += sum(f.key in there for f in new)
            new = [f for f in new if f.key not in there]
            if new:
                client.post_comment(project_id, item, comment_text(new))
                posted |= {f.key for f in new}
                summary["comments_posted"] += 1
                done += 1
    finally:
        _write_atomic(posted_path, json.dumps(sorted(posted)))
    return summary


# ----- the command line -----------------------------------------------------------------------------------
def run_cli(settings: Any, project_id: int, out_dir: Path | None = None, max_thumbnails: int = 200) -> dict:
    """``taxomoco disagreements --project ID``: pull the project, recompute the consensus, write the files.

    The model's opinion is the out-of-sample probabilities the last training saved next to its report
    (none before the first training). Writes ``report.json``, ``review.csv``, ``flags.csv``, ``items.csv``,
    ``annotators.csv`` and ``report.html`` (thumbnails of the first ``max_thumbnails`` review entries) to
    ``out_dir`` (default: the project's ``disagreements/`` folder, whose report ``GET /disagreements`` serves).

    Returns:
        ``{"project", "out_dir", "files", "summary"}``.
    """
    from ml_backend.reports.disagreement_html import thumbnail_png, write_csvs, write_html
    from ml_backend.net.images import fetch_many
    from ml_backend.training.data import pull_project
    from model.crowd.consensus import ConsensusPolicy, consensus
    from model.images import load_image

    source = pull_project(settings, project_id)
    annotations, problems = annotations_from_tasks(source.tasks, source.config)
    policy = ConsensusPolicy(min_annotators=settings.min_annotators, min_agreement=settings.min_agreement)
    saved_dir = report_path(settings, project_id).parent
    level_probs = _usable_probs(load_model_probs(saved_dir / MODEL_PROBS_FILE), source.config.taxonomy, problems)
    result = consensus(annotations, source.config.taxonomy, policy, level_probs=level_probs)
    version = None
    if level_probs and report_path(settings, project_id).is_file():
        version = load_report(settings, project_id).get("model_version")
    report = build_report(result, project_id, version, problems)

    out = Path(out_dir) if out_dir is not None else saved_dir
    out.mkdir(parents=True, exist_ok=True)
    files = [out / REPORT_FILE]
    _write_atomic(files[0], json.dumps(report, indent=1))
    files += write_csvs(report, out)

    tasks = {t.id: t for t in source.tasks}
    wanted = [e["item"] for e in report["review"][:max_thumbnails] if e["item"] in tasks]
    values = [str(tasks[t].data.get(source.config.image_key, "")) for t in wanted]
    thumbs: dict[int, bytes] = {}
    for task, got in zip(wanted, fetch_many(values, settings, source.conn, source.client.auth_headers())):
        if isinstance(got, Exception):
            log.info("no thumbnail for task %s: %s", task, got)
            continue
        try:
            thumbs[task] = thumbnail_png(load_image(got, settings.image_max_pixels))
        except Exception as exc:  # per-image boundary: one bad image must not stop the report
            log.info("no thumbnail for task %s: %s", task, exc)
    task_url = f"{source.conn.url}/projects/{int(project_id)}/data?task={{task}}"
    files.append(write_html(report, out / "report.html", thumbs, task_url=task_url, limit=max_thumbnails))
    return {"project": int(project_id), "out_dir": str(out), "files": [str(f) for f in files],
            "summary": report["summary"]}


def _usable_probs(probs: dict[int, list[Any]] | None, taxonomy: Any, problems: list[str]) -> dict[int, list[Any]] | None:
    """The saved probabilities when they fit the current taxonomy; else None with a problem noted."""
    if not probs:
        return None
    first = next(iter(probs.values()))
    shape = [len(p) for p in first]
    expected = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    if shape != expected:
        problems.append(
            f"The saved model probabilities have {shape} classes per level but the label config now has {expected}; "
            "they are ignored until the next training."
        )
        return None
    return probs


# ----- HTTP ---------------------------------------------------------------------------------------------------
def register_routes(app: Any, settings: Any) -> None:
    """``GET /disagreements?project=ID``: the project's saved report as JSON (what :func:`load_report` gives).

    Optional ``limit=N`` keeps the first N review entries, flags and items (the summary and annotators stay
    whole). Answers 400 for a missing or malformed project id, 404 before the first report exists.
    """
    from flask import jsonify, request

    from ml_backend.labelstudio.results import project_id_of

    @app.get("/disagreements")
    def disagreements_report():  # type: ignore[no-untyped-def]
        raw = request.args.get("project")
        if raw is None:
            return jsonify({"error": "Pass the Label Studio project id: GET /disagreements?project=ID."}), 400
        try:
            pid = project_id_of(raw)
            limit = request.args.get("limit")
            n = int(limit) if limit is not None else None
            if n is not None and n < 0:
                raise ValueError(limit)
        except (DataError, ValueError) as exc:
            return jsonify({"error": f"{exc}. Use ?project=<id>&limit=<count>."}), 400
        try:
            report = load_report(settings, pid)
        except DataError as exc:
            return jsonify({"error": str(exc)}), 404
        if n is not None:
            for key in ("review", "flags", "items"):
                report[key] = report.get(key, [])[:n]
        return jsonify(report)
