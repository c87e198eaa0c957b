"""The HTTP layer: the Flask app and its routes, auth, health, metrics, the server."""

__all__ = [
    "app",
    "auth",
    "data_routes",
    "health",
    "metrics",
    "server",
]
