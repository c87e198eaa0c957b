"""The `taxomoco` command line on a tiny synthetic folder tree: pretrain, train, evaluate, predict, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_backend.cli import main

# Colour + shape classes, so that even a few steps of training separate them.
CLASSES = {("warm", "red"): (220, 30, 30), ("warm", "orange"): (240, 150, 20), ("cold", "blue"): (30, 40, 220)}


def _image(colour: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    arr = rng.integers(0, 40, size=(24, 24, 3), dtype=np.uint8)
    y, x = rng.integers(2, 10, size=2)
    arr[y : y + 12, x : x + 12] = colour
    return Image.fromarray(arr)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for path, colour in CLASSES.items():
        d = root.joinpath(*path)
        d.mkdir(parents=True)
        for i in range(8):
            _image(colour, rng).save(d / f"{i}.png")
    (root / "warm" / "red" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return root


FAST = ["--arch", "resnet18-half", "--input-size", "32", "--device", "cpu"]


def test_train_with_pretraining_then_predict_and_evaluate(folder: Path, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    rc = main(["train", str(folder), "--models", str(models), "--pretrain", "--epochs", "1", "--batch-size", "8",
               "--memory-bank", "16", "--report", str(tmp_path / "report"), *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "1 unreadable images skipped" in out and "published model version" in out
    assert "model choice: " in out and "pixels+linear: hierarchical F1" in out and "encoder+mlp: hierarchical F1" in out
    page = (tmp_path / "report" / "report.html").read_text()
    assert "model choice: " in page and "encoder+prototypes" in page
    assert (models / "pretrain" / "loss.csv").exists() and (tmp_path / "report" / "report.html").exists()

    blue = folder / "cold" / "blue" / "0.png"
    rc = main(["predict", str(blue), str(folder / "warm" / "red" / "truncated.png"), "--models", str(models), "--device", "cpu"])
    assert rc == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 2
    assert tuple(rows[0]["path"]) in CLASSES and 0.0 < rows[0]["score"] <= 1.0
    assert "error" in rows[1]

    rc = main(["evaluate", str(folder), "--models", str(models), "--out", str(tmp_path / "eval"), "--device", "cpu"])
    assert rc == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["metrics"]["n"] == 24 and len(report["metrics"]["levels"]) == 2


def test_empty_folder_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["train", str(tmp_path / "empty"), "--models", str(tmp_path / "m"), *FAST]) == 2
    assert "error" in capsys.readouterr().err


def test_single_class_is_a_clear_error(folder: Path, tmp_path: Path, capsys) -> None:
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(one / "a.png")
    assert main(["train", str(tmp_path / "one"), "--models", str(tmp_path / "m"), *FAST]) == 2
    assert "single class" in capsys.readouterr().err


def test_predict_without_a_model_says_how_to_train(tmp_path: Path, capsys) -> None:
    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["predict", str(img), "--models", str(tmp_path / "none")]) == 2
    assert "train" in capsys.readouterr().err


def test_the_readme_recipe_runs_at_a_tiny_scale(tmp_path: Path, capsys) -> None:
    """The README's folder recipe on animal-mnist, as written there but on 240 images and a 6-second budget:
    export, pretrain on the defaults (recipe chosen from the images, plan fitted to the budget), train with the
    model choice, predict, evaluate."""
    from bench.export_animal_mnist import main as export

    demo = tmp_path / "demo"
    assert export([str(demo), "--labelled-fraction", "0.5", "--limit", "240"]) == 0
    enc, models = tmp_path / "demo-encoder", tmp_path / "demo-models"
    assert main(["pretrain", str(demo), "--out", str(enc), "--max-minutes", "0.1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "median side 28 px, grayscale -> input 32 px" in out  # the small-images recipe, chosen from the images
    assert "limited by budget" in out and "view retrieval (label-free quality)" in out
    assert (enc / "loss.png").is_file() and (enc / "quality.csv").is_file()
    assert main(["train", str(demo / "labelled"), "--encoder", str(enc), "--models", str(models),
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "model choice:" in out and "published model version" in out
    some = sorted((demo / "unlabelled").glob("*.png"))[:3]
    assert main(["predict", *map(str, some), "--models", str(models), "--device", "cpu"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(lines) == 3
    assert main(["evaluate", str(demo / "labelled"), "--models", str(models), "--out", str(tmp_path / "eval"),
                 "--device", "cpu"]) == 0
    assert (tmp_path / "eval" / "report.json").is_file()


def test_every_command_help_shows_defaults_and_environment() -> None:
    import argparse
    import dataclasses

    from ml_backend.cli import build_parser
    from ml_backend.settings import Settings

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    envs = [f.metadata["env"] for f in dataclasses.fields(Settings)]
    for name, command in sub.choices.items():
        formatter = command._get_formatter()
        for action in command._actions:
            if action.option_strings and action.dest != "help" and not action.required:
                shown = formatter._get_help_string(action) or ""
                assert "default" in shown, f"taxomoco {name} {action.option_strings[0]}: no default shown"
        text = " ".join(command.format_help().split())
        assert all(f"{env} (default:" in text for env in envs), name  # the one settings object: every variable
    serve = " ".join(sub.choices["serve"].format_help().split())
    assert "[env TAXOMOCO_PORT; default 9090]" in serve and "[env REDIS_URL; default unset]" in serve
