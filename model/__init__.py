"""taxomoco model core: taxonomy, encoder, MoCo pretraining, heads, bundles, evaluation (pure ML)."""

__all__ = [
    "arrays",
    "atomic",
    "bundle",
    "crowd",
    "data",
    "encoder",
    "errors",
    "evaluation",
    "heads",
    "images",
    "predictor",
    "report",
    "ssl",
    "taxonomy",
]
