"""The ``taxomoco`` command line.

Model commands work on folders of images without Label Studio (``pretrain``, ``train``, ``evaluate``,
``predict``); service commands run the backend (``serve``, ``worker``) and the disagreement report
(``disagreements``). Heavy libraries are imported only by the command that needs them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from ml_backend.settings import Settings
from model.errors import TaxomocoError

__all__ = ["build_parser", "main"]

log = logging.getLogger("taxomoco")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help; descriptions and epilogs (the environment) printed as written."""


FOLDER_EPILOG = "environment: reads no taxomoco environment variable; every setting of this command is a flag above."


def _settings_epilog() -> str:
    """The environment variables a service command reads (the one settings object), with defaults."""
    lines = ["environment (read once at start-up; a flag above overrides its variable; see the README's table):"]
    for env, default, help_text in Settings.describe():
        lines.append(f"  {env} (default: {default}): {help_text}")
    return "\n".join(lines)


def _setting(name: str, what: str | None = None) -> str:
    """Help of a flag that overrides a setting: what it is, its environment variable and default."""
    field = next(f for f in dataclasses.fields(Settings) if f.name == name)
    default = next(d for env, d, _ in Settings.describe() if env == field.metadata["env"])
    return f"{what or field.metadata['help']} [env {field.metadata['env']}, default {default}]"


def _service(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=_settings_epilog(),
                          formatter_class=_Formatter, argument_default=argparse.SUPPRESS)


def _folder(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=help_text, epilog=FOLDER_EPILOG, formatter_class=_Formatter)


def _add_encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="resnet18-half", choices=["resnet18", "resnet18-half"], help="backbone")
    p.add_argument("--input-size", type=int, default=64, help="encoder input size in pixels")
    p.add_argument("--init-weights", type=Path, default=None, help="local weights file to start the encoder from")


def _add_pretrain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=20, help="MoCo v2 epochs")
    p.add_argument("--batch-size", type=int, default=128, help="MoCo batch size")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget of the pretraining in minutes (None: --epochs only)")
    p.add_argument("--memory-bank", type=int, default=4096, help="negatives kept in the memory bank")
    p.add_argument("--temperature", type=float, default=0.1, help="InfoNCE temperature")
    p.add_argument("--lr", type=float, default=0.06, help="SGD learning rate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taxomoco", description=__doc__, formatter_class=_Formatter,
                                     epilog="`taxomoco COMMAND --help` shows each command's options, defaults and "
                                            "environment variables.")
    parser.add_argument("--log-level", default="INFO", help="Python logging level of the console")
    sub = parser.add_subparsers(dest="command", required=True)

    p = _folder(sub, "pretrain", "MoCo v2 self-supervised pretraining on a folder of images (labels unused)")
    p.add_argument("images_dir", type=Path, help="folder of images (searched recursively)")
    p.add_argument("--out", type=Path, default=Path("taxomoco-encoder"), help="where the encoder, checkpoints and loss curve go")
    p.add_argument("--no-resume", action="store_true", help="start over instead of resuming the last checkpoint")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    _add_encoder_args(p)
    _add_pretrain_args(p)

    p = _folder(sub, "train", "train the taxonomy heads on a labelled folder tree (folder path = taxonomy path)")
    p.add_argument("images_dir", type=Path, help="labelled images: IMAGES_DIR/<level 1>/<level 2>/.../image.png")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory (versions are published here)")
    p.add_argument("--encoder", type=Path, default=None, help="encoder directory written by `taxomoco pretrain`")
    p.add_argument("--pretrain", action="store_true", help="run MoCo pretraining first (on labelled + unlabelled images)")
    p.add_argument("--unlabelled", type=Path, default=None, help="folder of unlabelled images (used by --pretrain)")
    p.add_argument("--unlabelled-list", type=Path, default=None, help="text file with one unlabelled image path per line")
    p.add_argument("--report", type=Path, default=None, help="write the cross-validated evaluation report here")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    _add_encoder_args(p)
    _add_pretrain_args(p)

    p = _folder(sub, "evaluate", "evaluate the live model on a labelled folder tree; JSON + PNG + HTML report")
    p.add_argument("images_dir", type=Path, help="labelled images the model was not trained on")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory written by `train`")
    p.add_argument("--out", type=Path, default=Path("taxomoco-report"), help="report folder")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")

    p = _folder(sub, "predict", "predict taxonomy paths for image files (one JSON line per image)")
    p.add_argument("images", type=Path, nargs="+", help="image files")
    p.add_argument("--models", type=Path, default=Path("taxomoco-models"), help="model directory written by `train`")
    p.add_argument("--all-levels", action="store_true", help="allow prefix paths (like leafsOnly=false)")
    p.add_argument("--prefix-threshold", type=float, default=0.5,
                   help="with --all-levels: stop at the deepest prefix at least this probable")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")

    p = _service(sub, "serve", "run the Label Studio ML backend (waitress)")
    p.add_argument("--host", help=_setting("host"))
    p.add_argument("--port", type=int, help=_setting("port"))
    p.add_argument("--model-dir", type=Path, help=_setting("model_dir"))
    p.add_argument("--redis-url", help=_setting("redis_url"))

    p = _service(sub, "worker", "run an RQ training worker (needs REDIS_URL)")
    p.add_argument("--model-dir", type=Path, help=_setting("model_dir"))
    p.add_argument("--redis-url", help=_setting("redis_url"))
    p.add_argument("--queues", nargs="*", help="queue names [default: PRETRAIN_QUEUE, then HEADS_QUEUE]")
    p.add_argument("--burst", action="store_true", help="exit when the queues are empty [default: keep listening]")
    p.add_argument("--device", help=_setting("device"))

    p = _service(sub, "disagreements", "annotator disagreement report of a Label Studio project")
    p.add_argument("--project", type=int, required=True, help="Label Studio project id")
    p.add_argument("--model-dir", type=Path, help=_setting("model_dir"))
    p.add_argument("--out", type=Path, help="output folder [default: the project's disagreements folder]")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command in ("pretrain", "train", "evaluate", "predict"):
        from ml_backend import cli_folders as pipeline

        return pipeline.run_command(args)

    overrides = {k: getattr(args, k, None) for k in ("host", "port", "model_dir", "redis_url", "device")}
    settings = Settings.from_env(**overrides)
    if args.command == "serve":
        from ml_backend.http.server import serve

        serve(settings)
    elif args.command == "worker":
        from ml_backend.queue.worker import run_worker

        run_worker(settings, queues=getattr(args, "queues", None), burst=getattr(args, "burst", False))
    elif args.command == "disagreements":
        from ml_backend.reports.disagreements import run_cli

        report = run_cli(settings, args.project, getattr(args, "out", None))
        print(json.dumps(report, indent=2) if isinstance(report, dict) else report)
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
