"""Outbound fetching of task images with guards."""

__all__ = [
    "images",
]
