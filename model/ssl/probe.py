"""The speed probe of a pretraining run: seconds per optimiser step, measured on the run's own data and device
before the run is planned (:mod:`model.ssl.plan`)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch.utils.data import DataLoader

from model.errors import DataError
from model.ssl.moco import MoCoV2

__all__ = ["PROBE_STEPS", "probe_seconds_per_step"]

PROBE_STEPS = 4
"""Steps the probe runs (the first is not timed: it pays for lazy initialisation)."""


def probe_seconds_per_step(module: MoCoV2, loader: DataLoader[Any], precision: str, accelerator: str) -> float:
    """Seconds of one training step (loading + augmenting a batch, forward, backward, SGD) on a throw-away copy of
    the module, on the device the run will use."""
    on_gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    device = torch.device("cuda" if on_gpu else "cpu")
    probe = copy.deepcopy(module).to(device)
    probe.train()
    optimizer = torch.optim.SGD([p for p in probe.parameters() if p.requires_grad], lr=1e-4)
    bf16 = "bf16" in precision
    times: list[float] = []
    batches = iter(loader)
    t0 = time.perf_counter()
    for _ in range(PROBE_STEPS):
        try:
            views, indices, _ = next(batches)
        except StopIteration:
            batches = iter(loader)
            views, indices, _ = next(batches)
        if views is None or len(indices) < 2:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = probe.contrastive_loss(views[0].to(device), views[1].to(device))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
        optimizer.step()
        if on_gpu:
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        t0 = t1
    timed = times[1:] or times
    if not timed:
        raise DataError("none of the probed pretraining batches could be read; check the images.")
    return sum(timed) / len(timed)
