"""Label Studio ids as the backend accepts them at its boundary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from model.errors import DataError

__all__ = ["project_id_of"]


def project_id_of(value: Any) -> int:
    """The Label Studio project id in any form Label Studio sends it.

    Accepts ``7``, ``"7"``, ``"7.1712345678"`` (/setup's "<id>.<created timestamp>") and ``{"id": 7}``.

    Raises:
        DataError: anything else, naming the value.
    """
    if isinstance(value, Mapping):
        value = value.get("id")
    if isinstance(value, bool):
        value = None
    if isinstance(value, int):
        if value >= 0:
            return value
    elif isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    elif isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if head.isdigit():
            return int(head)
    raise DataError(
        f"Cannot read a Label Studio project id from {value!r}; send the project as 7, \"7\", "
        "\"7.<timestamp>\" or {\"id\": 7}."
    )
