"""Nearest neighbours over embeddings: the exact kNN index, its on-disk generations, the kNN graph, near-duplicate groups.

:data:`NEAR_DUPLICATE_THRESHOLD` lives here (no heavy imports) so that the settings can name it as their default;
how it was calibrated is told in ``model.neighbors.duplicates``.
"""

__all__ = [
    "AUTO_THRESHOLD_CAP",
    "NEAR_DUPLICATE_THRESHOLD",
    "duplicates",
    "generations",
    "graph",
    "index",
    "vectors",
]

NEAR_DUPLICATE_THRESHOLD = 0.0
"""Default cosine similarity from which two different images count as near-duplicates: 0 = calibrated for each
encoder from the project's own embeddings (``model.neighbors.duplicates.auto_threshold``)."""
AUTO_THRESHOLD_CAP = 0.9996
"""The automatic threshold never exceeds this: where a default-budget MoCo encoder of animal-mnist separates
JPEG-75 copies from distinct images (``bench/results/similarity.txt``). When many images have near copies, the
quantile the automatic rule reads lands among the copies themselves; the cap keeps them findable."""
