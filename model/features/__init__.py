"""Feature extractors that turn images into ``(N, D)`` vectors for the heads: the CNN encoder or plain pixels."""

__all__ = [
    "extractor",
    "pixels",
]
