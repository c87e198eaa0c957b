"""The on-disk generations of a persisted kNN index (``model.neighbors.index``), like ``model.bundle``'s ``LIVE``::

    dir/CURRENT               the name of the complete generation (replaced atomically)
    dir/gen-<ns>-<hex>/       index.faiss (faiss.write_index), keys.txt (one key a line), meta.json

A write fills a hidden temporary directory, renames it to a new generation and only then replaces ``CURRENT``;
the generation before stays (a reader may be opening it) and older ones are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import faiss

from model.atomic import atomic_write_text, fsync_dir
from model.errors import DataError

__all__ = ["CURRENT", "read_generation", "write_generation"]

CURRENT = "CURRENT"
INDEX_FILE = "index.faiss"
KEYS_FILE = "keys.txt"
META_FILE = "meta.json"
FORMAT = 1


def write_generation(root: Path, flat: faiss.IndexFlatIP, keys: list[str], meta: dict[str, Any],
                     durable: bool) -> Path:
    """Write ``flat`` and its row ``keys`` as a new generation of ``root`` and make it current.

    Args:
        root: the index directory (created).
        flat: the faiss index.
        keys: the key of every row of ``flat``.
        meta: what meta.json records beside the format number (``dim``, ``count`` and the encoder version).
        durable: fsync files and directories (a crash after the call cannot lose the index).

    Returns:
        The new generation's directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = f"gen-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # sorts by creation time
    tmp = root / f".tmp-{name}"
    tmp.mkdir()
    try:
        faiss.write_index(flat, str(tmp / INDEX_FILE))
        (tmp / KEYS_FILE).write_text("".join(k + "\n" for k in keys), encoding="utf-8")
        (tmp / META_FILE).write_text(json.dumps({"format": FORMAT, **meta}), encoding="utf-8")
        if durable:
            for f in (INDEX_FILE, KEYS_FILE, META_FILE):
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
        tmp.rename(root / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / CURRENT, name + "\n", durable=durable)
    _prune_generations(root, keep={name, _previous(root, name)})
    return root / name


def read_generation(gen: Path) -> tuple[dict[str, Any], list[str], faiss.IndexFlatIP]:
    """The meta.json, row keys and faiss index of one generation directory.

    Raises:
        DataError: its files are damaged or disagree (naming the remedy).
    """
    try:
        meta = json.loads((gen / META_FILE).read_text(encoding="utf-8"))
        keys = (gen / KEYS_FILE).read_text(encoding="utf-8").splitlines()
        flat = faiss.read_index(str(gen / INDEX_FILE))
    except (OSError, ValueError, RuntimeError) as exc:  # faiss raises RuntimeError for a damaged file
        raise DataError(f"the neighbour index in {gen} cannot be read ({exc.__class__.__name__}); it is rebuilt "
                        "by the next training (or delete the directory).") from None
    consistent = meta.get("format") == FORMAT and flat.d == meta.get("dim") and flat.ntotal == len(keys) == meta.get("count")
    if not isinstance(flat, faiss.IndexFlatIP) or not consistent:
        raise DataError(f"the neighbour index in {gen} is inconsistent (meta {meta}, {flat.ntotal} vectors, "
                        f"{len(keys)} keys); it is rebuilt by the next training (or delete the directory).")
    return meta, keys, flat


def _generations(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("gen-"))


def _previous(root: Path, name: str) -> str:
    older = [g for g in _generations(root) if g < name]
    return older[-1] if older else ""


def _prune_generations(root: Path, keep: set[str]) -> None:
    for p in root.iterdir():
        stale_tmp = p.name.startswith(".tmp-") and time.time() - p.stat().st_mtime > 3600
        if (p.name.startswith("gen-") and p.name not in keep) or stale_tmp:
            shutil.rmtree(p, ignore_errors=True)
