"""Schedulers that turn Label Studio events into training jobs: embedded (child processes) or RQ (workers), and the RQ worker."""

__all__ = [
    "base",
    "child",
    "embedded",
    "factory",
    "rq_queue",
    "worker",
]
