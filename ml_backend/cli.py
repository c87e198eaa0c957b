"""The ``taxomoco`` command line.

Model commands work on folders of images without Label Studio (``pretrain``, ``train``, ``evaluate``,
``predict``, ``similar IMAGE``); service commands run the backend (``serve``, ``worker``), the disagreement
report (``disagreements``) and similar-task search (``similar --project``). Heavy libraries are imported only
by the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from model.errors import DataError, TaxomocoError

__all__ = ["build_parser", "main"]

log = logging.getLogger("taxomoco")


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet18-half", choices=["resnet18", "resnet18-half"], help="backbone")
    p.add_argument("--input-size", type=int, default=64, help="encoder input size in pixels")
    p.add_argument("--init-weights", type=Path, default=None, help="local weights file to start the encoder from")


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=20, help="MoCo v2 epochs")
    p.add_argument("--batch-size", type=int, default=128, help="MoCo batch size")
    p.add_argument("--max-minutes", type=float, default=None, help="time budget of the pretraining")
    p.add_argument("--memory-bank", type=int, default=4096, help="negatives kept in the memory bank")
    p.add_argument("--temperature", type=float, default=0.1, help="InfoNCE temperature")
    p.add_argument("--lr", type=float, default=0.06, help="SGD learning rate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taxomoco", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="MoCo v2 self-supervised pretraining on a folder of images (labels unused)")
    p.add_argument("images_dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, default=Path("taxomoco-encoder"), help="where the encoder, checkpoints and loss curve go")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming the last checkpoint")
    p.add_argument("--device", default="auto")
    _add_encoder_args(p)
    _add_pretrain_args(p)

    p = sub.add_parser("train", help="train the taxonomy heads on a labelled folder tree (folder path = taxonomy path)")
    p.add_argument("images_dir", type=Path, help="labelled images: IMAGES_DIR/<level 1>/<level 2>/.../image.png")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory (versions are published here)")
    p.add_argument("--encoder", type=Path, default=None, help="encoder directory written by `taxomoco pretrain`")
    p.add_argument("--pretrain", action="store_true", help="run MoCo pretraining first (on labelled + unlabelled images)")
    p.add_argument("--unlabelled", type=Path, default=None, help="folder of unlabelled images (used by --pretrain)")
    p.add_argument("--unlabelled-list", type=Path, default=None, help="text file with one unlabelled image path per line")
    p.add_argument("--report", type=Path, default=None, help="write the cross-validated evaluation report here")
    p.add_argument("--device", default="auto")
    _add_encoder_args(p)
    _add_pretrain_args(p)

    p = sub.add_parser("evaluate", help="evaluate the live model on a labelled folder tree; JSON + PNG + HTML report")
    p.add_argument("images_dir", type=Path)
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"))
    p.add_argument("--out", type=Path, default=Path("taxomoco-report"))
    p.add_argument("--device", default="auto")

    p = sub.add_parser("predict", help="predict taxonomy paths for image files")
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"))
    p.add_argument("--all-levels", action="store_true", help="allow prefix paths (like leafsOnly=false)")
    p.add_argument("--prefix-threshold", type=float, default=0.5)
    p.add_argument("--device", default="auto")

    p = sub.add_parser("serve", help="run the Label Studio ML backend (waitress); settings from env vars, see README")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--redis-url", default=None)

    p = sub.add_parser("worker", help="run an RQ training worker (needs REDIS_URL)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--redis-url", default=None)
    p.add_argument("--queues", nargs="*", default=None, help="queue names (default: pretrain and heads queues)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    p.add_argument("--device", default=None)

    p = sub.add_parser("similar", help="similar images: of a Label Studio task (--project, --task) or of image files "
                                       "among a folder's images (IMAGE ... --models DIR [--among FOLDER])")
    p.add_argument("images", type=Path, nargs="*", help="query image files (folder mode)")
    p.add_argument("--project", type=int, default=None, help="Label Studio project id (with --task)")
    p.add_argument("--task", type=int, default=None, help="task whose similar tasks to list (with --project)")
    p.add_argument("--k", type=int, default=20, help="neighbours per query")
    p.add_argument("--model-dir", type=Path, default=None, help="MODEL_DIR of the backend (project mode)")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory (folder mode)")
    p.add_argument("--among", type=Path, default=None,
                   help="folder of images to search (indexed and kept beside the model; default: the images "
                        "`taxomoco train` indexed)")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("disagreements", help="annotator disagreement report of a Label Studio project")
    p.add_argument("--project", type=int, required=True)
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the project's disagreements folder)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "similar" and args.project is None:
        if args.task is not None or not args.images:
            raise DataError("taxomoco similar: pass --project ID --task TID, or image files with --models DIR.")
        from ml_backend import cli_folders as pipeline

        return pipeline.run_command(args)
    if args.command in ("pretrain", "train", "evaluate", "predict"):
        from ml_backend import cli_folders as pipeline

        return pipeline.run_command(args)
    from ml_backend.settings import Settings

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "model_dir", "redis_url", "device")}
    settings = Settings.from_env(**overrides)
    if args.command == "serve":
        from ml_backend.http.server import serve

        serve(settings)
    elif args.command == "worker":
        from ml_backend.queue.worker import run_worker

        run_worker(settings, queues=args.queues, burst=args.burst)
    elif args.command == "disagreements":
        from ml_backend.reports.disagreements import run_cli

        report = run_cli(settings, args.project, args.out)
        print(json.dumps(report, indent=2) if isinstance(report, dict) else report)
    elif args.command == "similar":
        from ml_backend.serving.similar import similar_tasks

        if args.task is None:
            raise DataError("taxomoco similar --project ID needs --task TID.")
        print(json.dumps(similar_tasks(settings.project(args.project), args.task, args.k), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except TaxomocoError as exc:
        print(f"taxomoco {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"taxomoco {args.command}: error: out of memory; lower --batch-size and try again.", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"taxomoco {args.command}: interrupted (pretraining resumes from its last checkpoint).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
