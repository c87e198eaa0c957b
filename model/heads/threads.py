"""Threads for the heads' small problems: more threads only wait on each other.

Heads train on embeddings of the labelled images only (N x D values, N often a few dozen to a few thousand); on a
CPU such matrices are too small for several torch or BLAS threads to pay off, and on a busy machine the extra
threads make it much slower (measured: 200 MLP-head steps on 80 x 256 embeddings took 2.6 s with one torch thread
and 12.4 s with two on a loaded 2-core machine; scikit-learn's logistic regression on 54 rows took 7.9 s with
OpenBLAS's default threads and 0.07 s with one).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits

__all__ = ["SINGLE_THREAD_BELOW", "one_thread_when_small"]

SINGLE_THREAD_BELOW = 5_000_000
"""Problems of fewer embedding values (N x D) than this run on one torch thread and one BLAS thread."""


@contextmanager
def one_thread_when_small(values: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """One torch thread and one BLAS thread while a problem of ``values`` embedding values runs on the CPU."""
    if torch.device(device).type != "cpu" or values >= SINGLE_THREAD_BELOW:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)
