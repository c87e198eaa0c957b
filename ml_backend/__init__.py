"""taxomoco Label Studio ML backend: HTTP, Label Studio JSON, queue, model store (all I/O)."""

import os

# OpenMP threads that wait actively (libgomp's default) spin on the cores the other threads of the same forward,
# or the other product process (the server and a training child), need: on a busy machine the embedding forward
# ran 10-30x slower at torch's default threads than with passive waiting (bench/results/thread_policy.txt). The
# runtime reads the variable once, when torch loads, so it is set here, before any module of the product imports
# torch; an operator's own value is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = [
    "cli",
    "cli_folders",
    "configs",
    "encoder_dir",
    "folder_embeddings",
    "http",
    "labelstudio",
    "net",
    "paths",
    "queue",
    "reports",
    "serving",
    "settings",
    "training",
]
