"""MoCo v2 loss and momentum maths against hand computations; pretraining runs, resume, skipping."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image

from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.config import EncoderConfig
from model.errors import ConfigError, DataError
from model.ssl.checkpoint import checkpoint_every
from model.ssl.config import PretrainConfig
from model.ssl.moco import MoCoV2
from model.ssl.pretrain import pretrain

ENC = EncoderConfig(input_size=32)
TINY = PretrainConfig(epochs=1, batch_size=8, memory_bank_size=32, proj_hidden_dim=32, proj_out_dim=16, max_minutes=None)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    """Synthetic 24x28 colour images: a random blob on a random background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.empty((24, 28, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, 16, 2)
        img[y:y + 8, x:x + 10] = rng.integers(0, 256, 3)
        out.append(img)
    return out


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(buf, format="PNG")
    return buf.getvalue()[:60]


def test_loss_matches_hand_written_infonce_with_memory_bank() -> None:
    torch.manual_seed(0)
    module = MoCoV2(build_backbone(ENC), memory_bank_size=16, temperature=0.2, proj_hidden_dim=32,
                    proj_out_dim=8, channels_last=False)
    module.train()
    bank = F.normalize(torch.randn(16, 8), dim=1)
    module.criterion.memory_bank.bank = bank.clone()
    module.criterion.memory_bank.bank_ptr.zero_()
    xq, xk = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)

    # Reference: MoCo's pseudo-code with the bank as negatives (computed on copies of the same state).
    state = {k: v.clone() for k, v in module.state_dict().items()}
    q = F.normalize(module.forward(xq), dim=1)  # (4, 8)
    with torch.no_grad():
        k = F.normalize(module.forward_momentum(xk), dim=1)  # (4, 8)
    module.load_state_dict(state)  # forward in train mode moved BatchNorm statistics: undo
    l_pos = (q * k).sum(1, keepdim=True)  # (4, 1)
    l_neg = q @ bank.T  # (4, 16)
    logits = torch.cat([l_pos, l_neg], 1) / 0.2
    expected = -torch.log_softmax(logits, 1)[:, 0].mean()

    got = module.contrastive_loss(xq, xk)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The keys were enqueued into the bank after the loss was computed.
    torch.testing.assert_close(module.criterion.memory_bank.bank[:4], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.criterion.memory_bank.bank[4:], bank[4:])
    assert int(module.criterion.memory_bank.bank_ptr) == 4
    got.backward()
    assert module.backbone.conv1.weight.grad is not None
    assert module.backbone_momentum.conv1.weight.grad is None


def test_momentum_update_is_an_exponential_moving_average() -> None:
    torch.manual_seed(0)
    module = MoCoV2(build_backbone(ENC), memory_bank_size=16, proj_hidden_dim=32, proj_out_dim=8)
    assert all(not p.requires_grad for p in module.backbone_momentum.parameters())
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(torch.randn_like(p))
    query = [p.detach().clone() for p in module.backbone.parameters()]
    key = [p.detach().clone() for p in module.backbone_momentum.parameters()]
    module.momentum_update(0.9)
    for q, k_old, k_new in zip(query, key, module.backbone_momentum.parameters()):
        torch.testing.assert_close(k_new, 0.9 * k_old + 0.1 * q)
    assert module.ema_momentum() == pytest.approx(0.99)  # step 0 of the cosine schedule


def test_tiny_run_writes_outputs_and_skips_truncated(tmp_path: Path) -> None:
    images: list = _images(31) + [_truncated_png()]
    result = pretrain(images, ENC, TINY, tmp_path, progress=False)
    assert result.epochs_done == 1 and result.resumed_from_epoch is None
    assert [i for i, _ in result.skipped] == [31] and "truncated" in result.skipped[0][1]
    assert len(result.step_losses) == 4 and all(math.isfinite(v) for v in result.step_losses)
    assert result.images_per_second > 0
    assert result.encoder_version == encoder_version(result.backbone_state)
    assert set(result.backbone_state) == set(build_backbone(ENC).state_dict())
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader((tmp_path / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["loss"]) for r in rows] == pytest.approx(result.step_losses, abs=1e-5)
    # The weights changed from their initialisation.
    pl.seed_everything(TINY.seed, verbose=False)
    assert encoder_version(build_backbone(ENC).state_dict()) != result.encoder_version


class _OptimizerProbe(pl.Callback):
    """Captures the SGD momentum buffers and the learning rate the resumed run starts with."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.lr = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object,
                             batch_idx: int) -> None:
        if self.buffers:
            return
        opt = trainer.optimizers[0]
        self.buffers = [opt.state[p]["momentum_buffer"].clone() for p in opt.param_groups[0]["params"]
                        if p in opt.state]
        self.lr = opt.param_groups[0]["lr"]


def test_resume_continues_with_optimizer_state(tmp_path: Path) -> None:
    images = _images(32)
    first = pretrain(images, ENC, TINY, tmp_path, progress=False)
    ckpt1 = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    saved = [s["momentum_buffer"] for _, s in sorted(ckpt1["optimizer_states"][0]["state"].items())]

    probe = _OptimizerProbe()
    cfg3 = PretrainConfig(**{**TINY.__dict__, "epochs": 3})
    second = pretrain(images, ENC, cfg3, tmp_path, progress=False, callbacks=[probe])
    assert first.epochs_done == 1 and second.resumed_from_epoch == 1 and second.epochs_done == 3
    assert len(probe.buffers) == len(saved) > 0
    for a, b in zip(probe.buffers, saved):
        torch.testing.assert_close(a, b)
    # the larger epoch cap was planned again (12 steps, 1 of warm-up); the schedule continues at step 4
    assert probe.lr == pytest.approx(TINY.lr * 0.5 * (1 + math.cos(math.pi * 3 / 11)))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 * 4 and ckpt["epoch"] == 2
    assert ckpt["memory_bank"]["bank"].shape == (24, 16)  # fitted: the 32 images less one batch
    epochs = [int(r["epoch"]) for r in csv.DictReader((tmp_path / "loss.csv").open())]
    assert epochs == [0] * 4 + [1] * 4 + [2] * 4
    assert len(second.epoch_losses) == 2

    # Finished already: nothing more is trained, the weights come from the checkpoint.
    third = pretrain(images, ENC, cfg3, tmp_path, progress=False)
    assert third.epochs_done == 3 and third.step_losses == []
    assert third.encoder_version == second.encoder_version

    with pytest.raises(ConfigError, match="another encoder config"):
        pretrain(images, EncoderConfig(input_size=48), cfg3, tmp_path, progress=False)


def test_memory_bank_is_restored_from_checkpoint(tmp_path: Path) -> None:
    pretrain(_images(40), ENC, TINY, tmp_path, progress=False)  # 5 steps of 8 into a bank of 32
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    module = MoCoV2(build_backbone(ENC), memory_bank_size=32, proj_hidden_dim=32, proj_out_dim=16)
    module.on_load_checkpoint(ckpt)
    torch.testing.assert_close(module.criterion.memory_bank.bank, ckpt["memory_bank"]["bank"])
    assert int(module.criterion.memory_bank.bank_ptr) == 40 % 32


def test_empty_input_and_bad_config(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="needs at least 2"):
        pretrain([], ENC, TINY, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="memory_bank_size"):
        PretrainConfig(batch_size=64, memory_bank_size=32)
    assert PretrainConfig.from_dict(TINY.to_dict()) == TINY


class _SlowSteps(pl.Callback):
    """Makes every step look ``seconds`` slower than the probe measured to the run's budget keeper, as a machine
    that gets busy during a run would; the keeper's clock is moved on instead of sleeping, so the test does not
    depend on how fast the machine running it is."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def on_train_batch_end(self, *args: object) -> None:
        self.offset += self.seconds


def test_a_run_that_slows_down_is_refitted_to_its_budget_and_can_continue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    from model.ssl import runtime

    images = _images(32)
    cfg = PretrainConfig(**{**TINY.__dict__, "epochs": 50, "max_minutes": 0.5})  # 30 s
    slow = _SlowSteps(seconds=2.0)
    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(monotonic=slow.monotonic))
    first = pretrain(images, ENC, cfg, tmp_path, progress=False, callbacks=[slow])
    # each step took 2 s more than the probe measured: after the first 5 (10 s of 27 planned), the plan was
    # shortened to what fits (8 more steps), and finished on its own schedule, well before Lightning's hard stop
    assert first.plan is not None and first.plan.limited_by == "budget (re-fitted during the run)"
    assert first.finished_plan and first.steps_done == first.plan.steps < 50 * 4
    assert first.plan.steps <= 5 + 9
    assert first.epochs_done < 50 and len(first.step_losses) >= 1
    monkeypatch.undo()
    unlimited = PretrainConfig(**{**TINY.__dict__, "epochs": first.epochs_done + 1})
    second = pretrain(images, ENC, unlimited, tmp_path, progress=False)
    assert second.epochs_done == first.epochs_done + 1
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "loss.csv").open())]
    assert steps == list(range(1, len(steps) + 1))  # no step twice, none missing


@pytest.mark.parametrize("n_images, epochs", [(32, 20), (200, 2)])
def test_a_run_faster_than_its_probe_grows_its_plan_to_the_epoch_cap(
        n_images: int, epochs: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from model.ssl import pretrain as pretrain_module

    # the probe measured 1 s a step (a busy minute): 27 steps fit into SAFETY of the 30 s budget, whole epochs
    # for 32 images (6 epochs of 4 steps), 27 steps for 200 images (25 a step, under WHOLE_EPOCHS_FROM epochs);
    # the real steps take milliseconds, so the plan grows to the epoch cap and Lightning's stop moves with it
    monkeypatch.setattr(pretrain_module, "probe_seconds_per_step", lambda *a, **k: 1.0)
    cfg = PretrainConfig(**{**TINY.__dict__, "epochs": epochs, "max_minutes": 0.5})
    result = pretrain(_images(n_images), ENC, cfg, tmp_path, progress=False)
    per_epoch = n_images // 8
    assert result.plan is not None and result.plan.limited_by == "budget (re-fitted during the run)"
    assert result.plan.steps == epochs * per_epoch == result.steps_done and result.finished_plan
    assert result.epochs_done == epochs
    assert json.loads((tmp_path / "pretrain_config.json").read_text())["plan"]["steps"] == epochs * per_epoch


def test_backbone_weights_from_a_whole_moco_state_dict() -> None:
    from model.encoder.backbone import load_backbone_weights

    module = MoCoV2(build_backbone(ENC), memory_bank_size=16, proj_hidden_dim=32, proj_out_dim=8)
    target = build_backbone(ENC)
    load_backbone_weights(target, module.state_dict(), "MoCo state")
    assert encoder_version(target.state_dict()) == encoder_version(module.backbone.state_dict())


def test_batchnorm_statistics_are_recomputed_on_the_images_after_pretraining() -> None:
    """A short pretraining leaves running statistics near their initial values; they must describe the data."""
    from model.encoder.batchnorm import recalibrate_batchnorm
    from model.encoder.config import eval_transform

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(150, 255, (20, 20, 3), dtype=np.uint8)) for _ in range(8)]
    cfg = EncoderConfig(arch="resnet18-half", input_size=32)
    backbone = build_backbone(cfg).eval()
    assert recalibrate_batchnorm(backbone, images, cfg, max_images=8, batch_size=4) == 8
    x = torch.stack([eval_transform(cfg)(im) for im in images])  # (8, 3, 32, 32)
    with torch.no_grad():
        conv1 = backbone.conv1(x)  # reference: the statistics of what the first BatchNorm sees
    assert torch.allclose(backbone.bn1.running_mean, conv1.mean(dim=(0, 2, 3)), atol=1e-4)
    assert backbone.bn1.momentum == 0.1 and not backbone.training  # settings and mode restored
    with torch.no_grad():
        emb = backbone(x)
    assert torch.isfinite(emb).all() and emb.abs().max() < 1e3


class _SaveCounter(pl.Callback):
    def __init__(self) -> None:
        self.saves = 0

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self.saves += 1


def test_the_checkpoint_is_written_once_per_epoch(tmp_path: Path) -> None:
    """One ~38 MB checkpoint per epoch (last.ckpt), not a top-k copy beside it."""
    counter = _SaveCounter()
    pretrain(_images(16), ENC, dataclasses.replace(TINY, epochs=2), tmp_path, progress=False, callbacks=[counter])
    assert counter.saves == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]


def test_lightning_banners_tips_and_deprecations_stay_out_of_the_console(tmp_path: Path, caplog, recwarn) -> None:
    import logging

    caplog.set_level(logging.INFO)
    before = logging.getLogger("pytorch_lightning").level
    pretrain(_images(16), ENC, TINY, tmp_path, progress=False)
    assert logging.getLogger("pytorch_lightning").level == before  # restored after the run
    lightning = [r.getMessage() for r in caplog.records if r.name.startswith(("pytorch_lightning", "lightning"))]
    assert lightning == []  # no "GPU available", "💡 Tip: ... litlogger", "`Trainer.fit` stopped"
    assert [str(w.message) for w in recwarn if "pytorch_lightning" in w.filename or "lightning" in w.filename] == []


class _CheckpointSeen(pl.Callback):
    """Records, at each epoch's start, the epoch of the checkpoint on disk (None before the first)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[int | None] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        saved = torch.load(self.path, map_location="cpu", weights_only=False) if self.path.exists() else None
        self.seen.append(None if saved is None else int(saved["epoch"]))


def test_short_epochs_are_checkpointed_about_once_a_minute_and_the_last_one_always(tmp_path: Path) -> None:
    """A measured plan whose epochs take well under CHECKPOINT_EVERY_S writes no checkpoint at the epochs between,
    only at the run's end, and the run resumes from it; an unmeasured plan writes one each epoch."""
    seen = _CheckpointSeen(tmp_path / "timed" / "checkpoints" / "last.ckpt")
    timed = PretrainConfig(**{**TINY.__dict__, "epochs": 4, "max_minutes": 10.0})  # the probe measures the speed
    result = pretrain(_images(32), ENC, timed, tmp_path / "timed", progress=False, callbacks=[seen])
    assert result.plan is not None and result.plan.seconds_per_step and result.epochs_done == 4
    assert checkpoint_every(result.plan) > 4, result.plan  # 4 steps an epoch on a tiny encoder: far under a minute
    assert seen.seen == [None, None, None, None]
    saved = torch.load(tmp_path / "timed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["epoch"] == 3 and saved["global_step"] == 16
    again = pretrain(_images(32), ENC, timed, tmp_path / "timed", progress=False)
    assert again.resumed_from_epoch == 4 and again.step_losses == []

    every = _CheckpointSeen(tmp_path / "untimed" / "checkpoints" / "last.ckpt")
    untimed = PretrainConfig(**{**TINY.__dict__, "epochs": 3})
    pretrain(_images(32), ENC, untimed, tmp_path / "untimed", progress=False, callbacks=[every])
    assert every.seen == [None, 0, 1]
