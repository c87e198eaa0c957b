"""taxomoco model core: taxonomy, encoder, MoCo pretraining, heads, bundles, evaluation (pure ML)."""
