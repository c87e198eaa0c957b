"""Label Studio: client, auth, connections, label config, annotations in, results and flags out, task snapshots."""

__all__ = [
    "annotations",
    "auth",
    "client",
    "connections",
    "errors",
    "flags",
    "ids",
    "label_config",
    "results",
    "sdk",
    "snapshot",
    "tasks",
    "webhooks",
]
