"""Serving predictions: the per-project model store (hot reload) and the /predict pipeline."""

__all__ = [
    "predict",
    "store",
]
