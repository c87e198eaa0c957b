"""taxomoco Label Studio ML backend: HTTP, Label Studio JSON, queue, model store (all I/O)."""
