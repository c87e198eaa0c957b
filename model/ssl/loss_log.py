"""The pretraining loss log: ``loss.csv`` (one row per optimiser step) written at each epoch end, cut back to the
checkpoint on resume, and plotted to ``loss.png``."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from model.ssl.quality import read_quality_csv

__all__ = ["write_loss_plot"]


class _Recorder(Callback):
    """Records step losses, throughput and skipped images; appends ``loss.csv`` at each epoch end."""

    def __init__(self, csv_path: Path) -> None:
        self.csv_path = csv_path
        self.step_losses: list[float] = []
        self.epoch_losses: list[float] = []
        self._epoch_rows: list[tuple[int, int, float]] = []
        self.skipped: dict[int, str] = {}
        self.images = 0
        self.seconds = 0.0
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_rows = []
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        _views, indices, skipped = batch
        for index, reason in skipped:
            self.skipped.setdefault(int(index), reason)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.images += len(indices)
            value = float(loss.detach())
            self.step_losses.append(value)
            self._epoch_rows.append((trainer.current_epoch, trainer.global_step, value))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds += time.perf_counter() - self._t0
        if self._epoch_rows:
            self.epoch_losses.append(sum(r[2] for r in self._epoch_rows) / len(self._epoch_rows))
        if trainer.is_global_zero:
            new_file = not self.csv_path.exists()
            with self.csv_path.open("a", newline="") as f:
                writer = csv.writer(f)
                if new_file:
                    writer.writerow(["epoch", "step", "loss"])
                writer.writerows((e, s, f"{v:.6f}") for e, s, v in self._epoch_rows)


def write_loss_plot(csv_path: Path, png_path: Path, quality_csv: Path | None = None,
                    bank_full_step: int | None = None) -> None:
    """Plots ``loss.csv`` (per-step loss and per-epoch mean) into a PNG, with the label-free view-retrieval
    quality (``quality.csv``) on a second axis and a line at the step where the memory bank is full (before it,
    the loss has fewer negatives and is not comparable)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # optional heavy import, paid when plotting
    from matplotlib.figure import Figure

    steps, losses, epochs = [], [], []
    if csv_path.exists():
        with csv_path.open() as f:
            for row in csv.DictReader(f):
                epochs.append(int(row["epoch"]))
                steps.append(int(row["step"]))
                losses.append(float(row["loss"]))
    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, losses, lw=0.8, alpha=0.6, label="loss (step)")
    means: dict[int, list[tuple[int, float]]] = {}
    for e, s, v in zip(epochs, steps, losses):
        means.setdefault(e, []).append((s, v))
    if means:
        ax.plot([max(s for s, _ in r) for r in means.values()],
                [sum(v for _, v in r) / len(r) for r in means.values()], "o-", lw=1.5, ms=3, label="loss (epoch mean)")
    if bank_full_step:
        ax.axvline(bank_full_step, color="grey", ls="--", lw=1, label="memory bank full")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("InfoNCE loss")
    ax.set_title("MoCo v2 pretraining")
    handles, labels = ax.get_legend_handles_labels()
    quality = read_quality_csv(quality_csv) if quality_csv is not None else []
    if quality:
        ax2 = ax.twinx()
        ax2.plot([q.step for q in quality], [q.view_retrieval for q in quality], "s-", color="tab:green", ms=4,
                 label="view retrieval (label-free quality)")
        ax2.set_ylabel("view retrieval (higher is better)")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)


def _truncate_loss_csv(csv_path: Path, global_step: int) -> None:
    """Drops rows of steps the checkpoint does not hold (a run stopped after its last checkpoint)."""
    if not csv_path.exists():
        return
    with csv_path.open(newline="") as f:
        rows = list(csv.reader(f))
    kept = [rows[0]] + [r for r in rows[1:] if int(r[1]) <= global_step]
    if len(kept) != len(rows):
        with csv_path.open("w", newline="") as f:
            csv.writer(f).writerows(kept)
