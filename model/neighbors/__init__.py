"""Nearest neighbours over embeddings: the exact kNN index (search, kNN graph, persistence) and near-duplicate groups."""

__all__ = [
    "duplicates",
    "index",
]
