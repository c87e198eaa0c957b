"""The image encoder: config and input transform, backbone, device choice, batched embedding, embedding cache."""

__all__ = [
    "backbone",
    "cache",
    "config",
    "device",
    "embedder",
    "frozen",
]
