"""The training job and its steps: pull, labels, images, policy, encoder, fit, publish, disagreements, records."""

__all__ = [
    "calibration",
    "disagreements",
    "encoder",
    "fit",
    "images",
    "jobs",
    "labels",
    "policy",
    "publish",
    "pull",
    "records",
]
