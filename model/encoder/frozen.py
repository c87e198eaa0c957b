"""Using an encoder strictly read-only, verified: its weights and BatchNorm statistics must not change while
heads are trained on its embeddings."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["changed_state", "frozen", "snapshot_state"]


def snapshot_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every parameter and buffer (BatchNorm running stats included)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_state(module: nn.Module, snapshot: Mapping[str, Tensor]) -> list[str]:
    """Names of parameters/buffers of ``module`` that differ from ``snapshot`` (or were added/removed)."""
    now = module.state_dict()
    names = sorted(set(now) ^ set(snapshot))
    names += [k for k in now if k in snapshot and not torch.equal(now[k], snapshot[k])]
    return names


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Use ``module`` (an encoder) strictly read-only: eval mode, no grads, and verified unchanged on exit.

    Raises:
        RuntimeError: when any weight or BatchNorm statistic changed inside the block (a training bug).
    """
    before = snapshot_state(module)
    was_training = module.training
    flags = [p.requires_grad for p in module.parameters()]
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    try:
        yield module
    finally:
        module.train(was_training)
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)
    changed = changed_state(module, before)
    if changed:
        raise RuntimeError(f"The frozen encoder changed during head training: {changed[:10]}")
