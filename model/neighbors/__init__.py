"""Nearest neighbours over embeddings: the exact kNN index (search, kNN graph, persistence) and near-duplicate groups.

:data:`NEAR_DUPLICATE_THRESHOLD` lives here (no heavy imports) so that the settings can name it as their default;
how it was calibrated is told in ``model.neighbors.duplicates``.
"""

__all__ = [
    "NEAR_DUPLICATE_THRESHOLD",
    "duplicates",
    "index",
]

NEAR_DUPLICATE_THRESHOLD = 0.9996
"""Default cosine similarity from which two different images count as near-duplicates (``model.neighbors.duplicates``)."""
