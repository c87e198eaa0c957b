"""Lightning's console noise, kept out while a pretraining runs.

Lightning logs at INFO its device banner ("GPU available: False, used: False", "TPU available ..."), its precision,
why ``fit`` stopped, and tips that advertise its cloud products ("💡 Tip: ... try installing litlogger"); and it
warns of deprecations inside its own code (``isinstance(treespec, LeafSpec)``) and of data-loader worker counts
chosen on purpose. None of these is for the user of taxomoco. :func:`quiet_lightning` raises Lightning's loggers to
WARNING and ignores those warnings for the duration of a block; Lightning's real warnings and errors still show.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["LIGHTNING_LOGGERS", "quiet_lightning"]

LIGHTNING_LOGGERS = (
    "pytorch_lightning",
    "lightning",
    "lightning_fabric",
    "lightning.pytorch",
    "lightning.fabric",
)
"""The loggers Lightning's messages come from (the ``rank_zero`` helpers log below them)."""

_IGNORED_WARNINGS = (
    r".*does not have many workers.*",  # a single-worker loader is chosen on purpose (see PretrainConfig)
    r".*exceeds max_steps.*",
    r".*Checkpoint directory .* exists and is not empty.*",  # resuming writes into its own directory
    r".*isinstance\(treespec, LeafSpec\).* is deprecated.*",  # inside Lightning itself
    r".*litlogger.*|.*litmodels.*",
    r".*callbacks used to create the checkpoint need to be provided.*",  # the Timer of a run with a time budget
)


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Inside the block, Lightning logs only warnings and errors and its known noise warnings are ignored."""
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logging.WARNING, logger.getEffectiveLevel()))
    try:
        with warnings.catch_warnings():
            for pattern in _IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
