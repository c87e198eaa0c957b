"""The ``taxomoco`` command line.

Model commands work on folders of images without Label Studio (``pretrain``, ``train``, ``evaluate``,
``predict``, ``similar IMAGE``); service commands run the backend (``serve``, ``worker``), the disagreement
report (``disagreements``), the labeling order (``queue``) and similar-task search (``similar --project``). Heavy
libraries are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ml_backend.settings import Settings
from model.errors import DataError, TaxomocoError

__all__ = ["build_parser", "main"]

log = logging.getLogger("taxomoco")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs (the environment) printed as written; an option whose help names no default gets
    ``(default: ...)`` appended (a settings flag's help names its env var and default itself)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or action.required \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _epilog() -> str:
    """The environment variables every command reads (the one settings object), with their defaults."""
    lines = ["environment (read once at start-up into the one settings object; a flag above overrides its variable; "
             "the README's Settings table explains each):"]
    lines += [f"  {env} (default: {default})" for env, default, _ in Settings.describe()]
    return "\n".join(lines)


def _command(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=_epilog(), formatter_class=_Formatter)


def _override(p: argparse.ArgumentParser, flag: str, name: str, kind: type = str) -> None:
    """A flag of a service command that overrides setting ``name`` (None when not given: the env var applies)."""
    p.add_argument(flag, dest=name, type=kind, default=None, help=Settings.flag_help(name)[0])


SETTING_FLAGS = {
    "--arch": "arch", "--input-size": "input_size", "--init-weights": "init_weights", "--augment": "pretrain_augment",
    "--epochs": "pretrain_epochs", "--batch-size": "pretrain_batch_size", "--max-minutes": "pretrain_max_minutes",
    "--memory-bank": "pretrain_memory_bank", "--temperature": "pretrain_temperature", "--lr": "pretrain_lr",
    "--device": "device", "--prefix-threshold": "prefix_threshold",
}
"""Flags of the folder commands that set a backend setting: same meaning, default and env var as the backend."""


def _setting(p: argparse.ArgumentParser, flag: str) -> None:
    """A flag for one setting; its help and default come from :class:`Settings` (one source of defaults), and it
    is None when not given, so the env var or the default applies."""
    name = SETTING_FLAGS[flag]
    help_text, default = Settings.flag_help(name)
    kind = {int: int, float: float}.get(type(default), Path if name == "init_weights" else str)
    p.add_argument(flag, dest=name, type=kind, default=None, help=help_text)


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    for flag in ("--arch", "--input-size", "--init-weights", "--device"):
        _setting(p, flag)


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    for flag in ("--augment", "--epochs", "--batch-size", "--max-minutes", "--memory-bank", "--temperature", "--lr"):
        _setting(p, flag)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taxomoco", description=__doc__, formatter_class=_Formatter,
                                     epilog="`taxomoco COMMAND --help` shows each command's options, their defaults "
                                            "and the environment variables it reads.")
    parser.add_argument("--log-level", default="INFO", help="Python logging level of the console")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _command(sub, "pretrain", "MoCo v2 self-supervised pretraining on a folder of images (labels unused)")
    p.add_argument("images_dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, default=Path("taxomoco-encoder"), help="where the encoder, checkpoints and loss curve go")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming the last checkpoint")
    _add_encoder_args(p)
    _add_pretrain_args(p)

    p = _command(sub, "train", "train the taxonomy heads on a labelled folder tree (folder path = taxonomy path)")
    p.add_argument("images_dir", type=Path, help="labelled images: IMAGES_DIR/<level 1>/<level 2>/.../image.png")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory (versions are published here)")
    p.add_argument("--encoder", type=Path, default=None,
                   help="encoder directory written by `taxomoco pretrain` (default: none: --pretrain makes one, else a "
                        "randomly initialised encoder, a baseline)")
    p.add_argument("--pretrain", action="store_true", help="run MoCo pretraining first (on labelled + unlabelled images)")
    p.add_argument("--unlabelled", type=Path, default=None,
                   help="folder of unlabelled images (used by --pretrain; default: none)")
    p.add_argument("--unlabelled-list", type=Path, default=None,
                   help="text file with one unlabelled image path per line (default: none)")
    p.add_argument("--report", type=Path, default=None,
                   help="write the cross-validated evaluation report here (default: no report)")
    p.add_argument("--candidates", default=None,
                   help="models compared by cross-validated hierarchical F1, comma-separated (default: MODEL_CANDIDATES' "
                        "default without previous-encoder+mlp)")
    p.add_argument("--folds", type=int, default=None, help="cross-validation folds of the model choice (default: CV_FOLDS')")
    _add_encoder_args(p)
    _add_pretrain_args(p)

    p = _command(sub, "evaluate", "evaluate the live model on a labelled folder tree; JSON + PNG + HTML report")
    p.add_argument("images_dir", type=Path, help="labelled images the model was not trained on")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory written by `train`")
    p.add_argument("--out", type=Path, default=Path("taxomoco-report"), help="report folder")
    _setting(p, "--device")

    p = _command(sub, "predict", "predict taxonomy paths for image files (one JSON line per image)")
    p.add_argument("images", type=Path, nargs="+", help="image files")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory written by `train`")
    p.add_argument("--all-levels", action="store_true", help="allow prefix paths (like leafsOnly=false)")
    _setting(p, "--prefix-threshold")
    _setting(p, "--device")

    p = _command(sub, "serve", "run the Label Studio ML backend (waitress)")
    _override(p, "--host", "host")
    _override(p, "--port", "port", int)
    _override(p, "--model-dir", "model_dir", Path)
    _override(p, "--redis-url", "redis_url")

    p = _command(sub, "worker", "run an RQ training worker (needs REDIS_URL)")
    _override(p, "--model-dir", "model_dir", Path)
    _override(p, "--redis-url", "redis_url")
    p.add_argument("--queues", nargs="*", default=None, help="queue names (default: PRETRAIN_QUEUE, then HEADS_QUEUE)")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty")
    _setting(p, "--device")

    p = _command(sub, "similar", "similar images: of a Label Studio task (--project, --task) or of image files "
                                "among a folder's images (IMAGE ... --models DIR [--among FOLDER])")
    p.add_argument("images", type=Path, nargs="*", help="query image files (folder mode)")
    p.add_argument("--project", type=int, default=None, help="Label Studio project id (with --task; default: none, "
                                                             "folder mode)")
    p.add_argument("--task", type=int, default=None, help="task whose similar tasks to list (with --project; "
                                                          "default: none)")
    p.add_argument("--k", type=int, default=20, help="neighbours per query (default: %(default)s)")
    _override(p, "--model-dir", "model_dir", Path)
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"),
                   help="model directory (folder mode; default: %(default)s)")
    p.add_argument("--among", type=Path, default=None,
                   help="folder of images to search (indexed and kept beside the model; default: the images "
                        "`taxomoco train` indexed)")
    _setting(p, "--device")

    p = _command(sub, "disagreements", "annotator disagreement report of a Label Studio project")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    _override(p, "--model-dir", "model_dir", Path)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the project's disagreements folder)")
    p = _command(sub, "queue", "the labeling order of a Label Studio project (what GET /queue serves)")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--limit", type=int, default=50, help="tasks to print")
    _override(p, "--model-dir", "model_dir", Path)
    return parser


def _run(args: argparse.Namespace) -> int:
    overrides = {name: getattr(args, name, None) for name in set(SETTING_FLAGS.values())}
    overrides.update({k: getattr(args, k, None) for k in ("host", "port", "model_dir", "redis_url")})
    if args.command == "similar" and args.project is None:
        if args.task is not None or not args.images:
            raise DataError("taxomoco similar: pass --project ID --task TID, or image files with --models DIR.")
    settings = Settings.from_env(**overrides)
    if args.command in ("pretrain", "train", "evaluate", "predict") or (args.command == "similar" and not args.project):
        from ml_backend import cli_folders  # torch and the model stack, paid only by the folder commands

        return cli_folders.run_command(args, settings)
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
    elif args.command == "queue":
        from ml_backend.prelabel.order import read_queue  # with the command: the CLI imports per command

        queue = read_queue(settings.project(args.project))
        queue["tasks"] = queue.get("tasks", [])[:max(0, args.limit)]
        print(json.dumps(queue, indent=2))
    elif args.command == "similar":
        from ml_backend.serving.similar import similar_tasks

        if args.task is None:
            raise DataError("taxomoco similar --project ID needs --task TID.")
        print(json.dumps(similar_tasks(settings.project(args.project), args.task, args.k), indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # faiss logs each CPU-specific build it tries and cannot load ("Could not load library ... ModuleNotFoundError")
    # at INFO, which reads like a failure in the server's start-up log; the build it does load works.
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.getLogger().level))
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
