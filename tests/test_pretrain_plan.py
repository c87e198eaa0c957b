"""The pretraining plan (budget and data), the recipe chosen from the images, and the label-free quality signal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from model.encoder.backbone import build_backbone
from model.encoder.config import EncoderConfig
from model.ssl.augment import moco_v2_transform
from model.ssl.config import PretrainConfig
from model.ssl.plan import MIN_STEPS, SAFETY, bank_size, plan_run, steps_per_epoch, warmup_cosine
from model.ssl.pretrain import pretrain
from model.ssl.quality import learned, measure_view_quality, read_quality_csv
from model.ssl.recipe import ImageSummary, RecipeKind, choose_recipe, summarize_images


def test_budget_limits_the_plan_and_rounds_to_whole_epochs() -> None:
    # 10,000 images, batch 128: 78 steps per epoch; 20 minutes at 0.5 s/step plan 2,160 steps -> 27 whole epochs
    plan = plan_run(10_000, 128, max_epochs=300, max_minutes=20, seconds_per_step=0.5, configured_bank=4096)
    assert plan.steps_per_epoch == 78 and plan.limited_by == "budget"
    assert plan.steps == 27 * 78 and plan.whole_epochs
    assert plan.steps * 0.5 <= SAFETY * 20 * 60
    assert plan.warmup_steps == round(0.05 * plan.steps)
    assert plan.memory_bank_size == 4096
    # a generous budget: the epoch cap rules
    capped = plan_run(600, 128, max_epochs=50, max_minutes=600, seconds_per_step=0.5, configured_bank=4096)
    assert capped.limited_by == "epochs" and capped.steps == 50 * steps_per_epoch(600, 128) == 200
    assert capped.memory_bank_size == 384  # the 600 images less one batch, in whole batches
    # a budget of less than a few epochs keeps its step count; never below MIN_STEPS
    short = plan_run(100_000, 128, max_epochs=300, max_minutes=1, seconds_per_step=0.5, configured_bank=4096)
    assert short.steps == int(SAFETY * 60 / 0.5) and not short.whole_epochs
    tiny = plan_run(100_000, 128, max_epochs=300, max_minutes=0.01, seconds_per_step=0.5, configured_bank=4096)
    assert tiny.steps == MIN_STEPS


def test_warmup_then_cosine_reaches_zero_at_the_last_planned_step() -> None:
    total, warmup = 100, 10
    factors = [warmup_cosine(s, total, warmup) for s in range(total + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # monotone decay after warm-up
    assert bank_size(50, 64, 4096) == 64  # at least one batch


def test_recipe_follows_the_images() -> None:
    small_gray = ImageSummary(sampled=64, median_side=28, gray_share=1.0)
    size, aug, kind = choose_recipe(small_gray, on_gpu=False)
    assert (size, kind) == (32, RecipeKind.SMALL_IMAGES) and aug.min_scale == 0.35 and aug.gray_prob == 0.0
    photos = ImageSummary(sampled=64, median_side=200, gray_share=0.0)
    assert choose_recipe(photos, on_gpu=False)[0] == 64 and choose_recipe(photos, on_gpu=True)[0] == 96
    assert choose_recipe(photos, on_gpu=False)[2] is RecipeKind.MOCO_V2
    assert choose_recipe(photos, on_gpu=False)[1].gray_prob == 0.2
    assert choose_recipe(ImageSummary(64, 56, 0.0), on_gpu=True)[0] == 56  # never above the images' own size
    # explicit settings win
    assert choose_recipe(small_gray, on_gpu=False, input_size=48, kind=RecipeKind.MOCO_V2)[0::2] == (
        48, RecipeKind.MOCO_V2)


def test_summary_reads_size_and_colour() -> None:
    rng = np.random.default_rng(0)
    gray = [np.repeat(rng.integers(0, 255, (28, 30, 1), dtype=np.uint8), 3, axis=2) for _ in range(5)]
    colour = [rng.integers(0, 255, (120, 200, 3), dtype=np.uint8) for _ in range(5)]
    g, c = summarize_images(gray), summarize_images(colour)
    assert (g.sampled, g.median_side, g.grayscale) == (5, 28, True)
    assert (c.median_side, c.grayscale) == (120, False)
    assert summarize_images([b"not an image"]).sampled == 0


def _shapes(n: int, seed: int = 0) -> list[np.ndarray]:
    """Distinct 32x32 images: a random rectangle in one of several colours on a random background."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = np.empty((32, 32, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        y, x = rng.integers(0, 20, 2)
        h, w = rng.integers(6, 12, 2)
        img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        out.append(img)
    return out


def test_quality_signal_is_measured_without_changing_batchnorm_and_logged_through_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = EncoderConfig(input_size=32)
    backbone = build_backbone(enc)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = _shapes(64)
    q = measure_view_quality(backbone, images, moco_v2_transform(enc), step=0)
    assert q is not None and 0.0 <= q.view_retrieval <= 1.0 and q.alignment >= 0.0
    for k, v in backbone.state_dict().items():  # BatchNorm running statistics untouched
        if "num_batches_tracked" not in k:
            torch.testing.assert_close(v, before[k])
    # same seed, same views: the measurement repeats exactly
    again = measure_view_quality(backbone, images, moco_v2_transform(enc), step=0)
    assert again is not None and again.view_retrieval == q.view_retrieval

    cfg = PretrainConfig(epochs=5, batch_size=16, memory_bank_size=32, proj_hidden_dim=64, proj_out_dim=32,
                         max_minutes=None)
    result = pretrain(images, enc, cfg, tmp_path, progress=False)
    history = read_quality_csv(tmp_path / "quality.csv")
    assert [(q.step, round(q.view_retrieval, 4)) for q in result.quality] == [
        (q.step, q.view_retrieval) for q in history]
    assert history[0].step == 0 and history[-1].step == result.steps_done
    assert result.finished_plan and result.plan is not None and result.plan.steps == 5 * 4
    assert len(history) == 2 + len(range(2, 20, 2))  # before, every 20 // 8 = 2 steps, and at the end
    assert result.learned is learned(history) and isinstance(result.learned, bool)
    assert result.summary()["learned"] is result.learned


def test_ddp_processes_each_see_their_share_of_an_epoch() -> None:
    from model.ssl.runtime import processes

    assert processes(PretrainConfig(devices=2, strategy="ddp", accelerator="cpu")) == 2
    assert processes(PretrainConfig(devices=(0, 1, 2), strategy="ddp")) == 3
    assert processes(PretrainConfig(accelerator="cpu")) == 1
    # two processes: an epoch of 1,000 images is 500 per process -> 3 steps of 128, not 7
    assert plan_run(-(-1000 // 2), 128, 10, None, None, 4096).steps_per_epoch == 3


def _keep_budget(step_seconds: list[float], limit_s: float, planned: int, monkeypatch: pytest.MonkeyPatch,
                 rank0: Callable[[int], int] | None = None, ceiling: int | None = None, grow_by: int = 1,
                 loop: object = None) -> tuple[int, float]:
    """Runs :class:`BudgetKeeper` over steps of the given durations (a fake clock); returns the step the run
    stopped at and the clock there. ``rank0``: this process is one of 2 under DDP, and ``rank0(own projection)``
    is what rank 0 broadcasts."""
    import types
    from datetime import timedelta

    from model.ssl import runtime

    clock = [0.0]
    monkeypatch.setattr(runtime, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    keeper = runtime.BudgetKeeper(timedelta(seconds=limit_s), ceiling=ceiling, grow_by=grow_by)
    trainer = types.SimpleNamespace(global_step=0, should_stop=False)
    if loop is not None:
        trainer.fit_loop = loop
    if rank0 is not None:
        def broadcast(obj: int, src: int = 0) -> int:
            assert src == 0
            return rank0(obj)
        trainer.world_size, trainer.strategy = 2, types.SimpleNamespace(broadcast=broadcast)
    module = types.SimpleNamespace(hparams={"total_steps": planned})
    keeper.on_train_start(trainer, module)  # type: ignore[arg-type]
    for seconds in step_seconds:
        clock[0] += seconds
        trainer.global_step += 1
        keeper.on_train_batch_end(trainer, module)  # type: ignore[arg-type]
        if trainer.should_stop or clock[0] >= limit_s:
            break
    return trainer.global_step, clock[0]


def test_a_slowdown_late_in_a_run_shortens_the_plan_before_the_hard_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    # the probe planned 80 steps of 0.1 s into 10 s; from step 6 on, steps take 1 s (the machine got busy)
    step, clock = _keep_budget([0.1] * 5 + [1.0] * 100, limit_s=10.0, planned=80, monkeypatch=monkeypatch)
    # the schedule ended on its shortened plan before Lightning's hard stop at 10 s (a projection every 5 steps
    # from the run's average speed saw the slowdown only at step 10, and was cut at step 14)
    assert clock < 10.0 and 8 <= step < 14


def test_a_passing_slowdown_does_not_cut_the_rest_of_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # 250 steps of 0.1 s planned into 40 s (25 s of SAFETY's 36 s); steps 20-39 take 0.5 s (another process took
    # the core for 10 s), then the speed is back: the plan was shortened to ~87 steps during the slowdown, grew back
    # as the speed recovered, and the run finished all 250 planned steps within the limit (33 s; the keeper before
    # stopped it at the shortened 87)
    steps = [0.1] * 19 + [0.5] * 20 + [0.1] * 400
    step, clock = _keep_budget(steps, limit_s=40.0, planned=250, monkeypatch=monkeypatch)
    assert step == 250 and clock < 36.0


def test_under_ddp_every_process_follows_rank_0_s_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    # this process's own clock says the plan no longer fits (80 steps of 1.2 s: 96 s, over the 90 s SAFETY leaves of
    # 100 s), rank 0's says it does: the plan follows rank 0, so no process stops at a step of its own while the
    # others wait for it in their all-reduce
    seen: list[int] = []

    def rank0(own: int) -> int:
        seen.append(own)
        return 80
    step, clock = _keep_budget([1.2] * 100, limit_s=100.0, planned=80, monkeypatch=monkeypatch, rank0=rank0)
    assert step == 80 and clock < 100 and len(seen) == 15 and max(seen) < 80  # asked every 5th step; its own plan: shorter
    # and when rank 0 shortens the plan, this process stops there too, though its own clock would go on
    step, _ = _keep_budget([0.1] * 100, limit_s=100.0, planned=80, monkeypatch=monkeypatch, rank0=lambda own: 23)
    assert step == 23


def test_a_steady_run_keeps_its_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    step, clock = _keep_budget([0.1] * 100, limit_s=10.0, planned=80, monkeypatch=monkeypatch)
    assert step == 80 and clock == pytest.approx(8.0)


def test_steps_faster_than_the_probe_grow_the_plan_in_whole_epochs_early_in_the_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    # the probe measured 0.2 s a step: 40 steps (4 epochs of 10) planned into 9 s of a 10 s budget; the steps take
    # 0.125 s: at the first projection 72 fit, so the plan grows by 3 whole epochs, and Lightning's epoch stop with it
    loop = types.SimpleNamespace(max_epochs=4, epoch_loop=types.SimpleNamespace(max_steps=-1))
    step, clock = _keep_budget([0.125] * 200, limit_s=10.0, planned=40, monkeypatch=monkeypatch, ceiling=500,
                               grow_by=10, loop=loop)
    assert step == 70 and clock == 8.75 and loop.max_epochs == 7
    # not past the epoch cap
    loop = types.SimpleNamespace(max_epochs=4, epoch_loop=types.SimpleNamespace(max_steps=-1))
    step, _ = _keep_budget([0.125] * 200, limit_s=10.0, planned=40, monkeypatch=monkeypatch, ceiling=60, grow_by=10,
                           loop=loop)
    assert step == 60 and loop.max_epochs == 6
    # a plan that the epoch cap limited (no ceiling) keeps its steps
    step, _ = _keep_budget([0.125] * 200, limit_s=10.0, planned=40, monkeypatch=monkeypatch)
    assert step == 40
    # steps that get faster only in the second half of the plan do not stretch it (the learning rate is low by then)
    step, _ = _keep_budget([0.2] * 25 + [0.05] * 200, limit_s=10.0, planned=40, monkeypatch=monkeypatch,
                           ceiling=500, grow_by=10)
    assert step == 40


def test_a_grown_plan_is_shortened_again_when_the_machine_slows_down(monkeypatch: pytest.MonkeyPatch) -> None:
    # grown from 40 to 70 steps at step 5 (0.125 s steps), then the steps take 0.3 s from step 30 on: the plan is
    # cut to what fits and ends before the hard stop
    step, clock = _keep_budget([0.125] * 30 + [0.3] * 200, limit_s=10.0, planned=40, monkeypatch=monkeypatch,
                               ceiling=500, grow_by=10)
    assert 40 <= step < 70 and clock < 10.0
