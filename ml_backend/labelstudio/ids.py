"""Label Studio ids as the backend accepts them at its boundary: positive integers that fit a database key."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from model.errors import DataError

__all__ = ["MAX_ID", "project_id_of", "task_id_of"]

MAX_ID = 2**31 - 1
"""The largest id accepted (Label Studio's integer primary keys)."""

_DIGITS = re.compile(r"[0-9]{1,10}")


def _positive(value: Any, what: str, example: str) -> int:
    if isinstance(value, bool):
        value = None
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer() and abs(value) <= MAX_ID:
        number = int(value)
    elif isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if _DIGITS.fullmatch(head):  # ASCII digits only ("²" is a digit to str.isdigit)
            number = int(head)
    if number is None or not 1 <= number <= MAX_ID:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        raise DataError(f"Cannot read a Label Studio {what} id from {shown}; send a positive integer up to {MAX_ID}, "
                        f"e.g. {example}.")
    return number


def project_id_of(value: Any) -> int:
    """The Label Studio project id in any form Label Studio sends it.

    Accepts ``7``, ``"7"``, ``"7.1712345678"`` (/setup's "<id>.<created timestamp>") and ``{"id": 7}``.

    Raises:
        DataError: anything else (not a positive integer up to :data:`MAX_ID`), naming the value.
    """
    if isinstance(value, Mapping):
        value = value.get("id")
    return _positive(value, "project", '7, "7", "7.<timestamp>" or {"id": 7}')


def task_id_of(value: Any) -> int:
    """A task id (``12`` or ``"12"``).

    Raises:
        DataError: not a positive integer up to :data:`MAX_ID`.
    """
    return _positive(value, "task", '12 or "12"')
