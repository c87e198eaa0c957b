"""Nearest neighbours over embeddings: the exact kNN index, its on-disk generations, the kNN graph, near-duplicate groups.

:data:`NEAR_DUPLICATE_THRESHOLD` lives here (no heavy imports) so that the settings can name it as their default;
how it was calibrated is told in ``model.neighbors.duplicates``.
"""

__all__ = [
    "NEAR_DUPLICATE_THRESHOLD",
    "duplicates",
    "generations",
    "graph",
    "index",
    "vectors",
]

NEAR_DUPLICATE_THRESHOLD = 0.9996
"""Default cosine similarity from which two different images count as near-duplicates (``model.neighbors.duplicates``)."""
