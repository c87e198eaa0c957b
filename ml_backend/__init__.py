"""taxomoco Label Studio ML backend: HTTP, Label Studio JSON, queue, model store (all I/O)."""

__all__ = [
    "cli",
    "cli_folders",
    "configs",
    "http",
    "labelstudio",
    "net",
    "paths",
    "queue",
    "reports",
    "serving",
    "settings",
    "training",
]
