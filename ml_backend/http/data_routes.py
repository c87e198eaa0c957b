"""Endpoints that serve project data beyond the Label Studio protocol: ``GET /disagreements``."""

from __future__ import annotations

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from ml_backend.labelstudio.ids import project_id_of
from ml_backend.settings import Settings
from ml_backend.training.disagreements import load_report
from model.errors import DataError

__all__ = ["register_routes"]


def register_routes(app: Flask, settings: Settings) -> None:
    """``GET /disagreements?project=ID``: the project's saved report as JSON (what :func:`load_report` gives).

    Optional ``limit=N`` keeps the first N review entries, flags and items (the summary and annotators stay
    whole). Answers 400 for a missing or malformed project id, 404 before the first report exists.
    """
    @app.get("/disagreements")
    def disagreements_report() -> ResponseReturnValue:
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
            report = load_report(settings.project(pid))
        except DataError as exc:
            return jsonify({"error": str(exc)}), 404
        if n is not None:
            for key in ("review", "flags", "items"):
                report[key] = report.get(key, [])[:n]
        return jsonify(report)
