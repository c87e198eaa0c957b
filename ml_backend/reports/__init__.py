"""Reports written for people: the disagreement report as JSON, CSV and HTML."""

__all__ = [
    "disagreement_html",
    "disagreements",
]
