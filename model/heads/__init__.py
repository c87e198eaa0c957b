"""Per-level taxonomy heads on embeddings: training, consistent path decoding, temperature calibration, cross-validated fit."""

__all__ = [
    "calibration",
    "decode",
    "heads",
    "mlp_training",
    "training",
]
