"""NumPy array types for signatures, by element kind; shapes are documented where the arrays are born.

``FloatArray`` holds float32 embeddings as well as float64 probabilities and logits, ``IntArray`` class, row and
fold indices (``IGNORE`` = -1 included), ``BoolArray`` masks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["BoolArray", "FloatArray", "IntArray"]

FloatArray = NDArray[np.floating[Any]]
IntArray = NDArray[np.integer[Any]]
BoolArray = NDArray[np.bool_]
