"""Model versions on disk: publish whole, then switch one pointer; load only what is complete and consistent.

Layout under a model root::

    root/LIVE                                   the live version's name (replaced atomically)
    root/versions/<version>/manifest.json       what the version is (see :class:`Manifest`)
    root/versions/<version>/heads.safetensors   the taxonomy heads' weights
    root/encoders/<encoder_version>.safetensors the backbone weights, stored once per content hash

A version name is ``<UTC timestamp>-<6 hex>`` (``20261124T010203-ab12cd``) and sorts by creation time. A
heads-only retrain re-uses the encoder file. Everything is written with safetensors and JSON (no pickle);
``publish`` writes a hidden temporary directory, fsyncs, renames it into place and only then replaces
``LIVE``, so a crash at any point leaves the previous live version intact and loadable.
"""

from __future__ import annotations

from model.bundle.manifest import (
    ENCODERS,
    FORMAT,
    HEADS,
    LIVE,
    MANIFEST,
    PROPAGATED,
    VERSIONS,
    Manifest,
    ModelBundle,
    data_fingerprint,
    list_versions,
    live_version,
)
from model.bundle.reader import load_bundle, load_live
from model.bundle.writer import prune, publish

__all__ = [
    "ENCODERS",
    "FORMAT",
    "HEADS",
    "LIVE",
    "MANIFEST",
    "PROPAGATED",
    "Manifest",
    "ModelBundle",
    "VERSIONS",
    "data_fingerprint",
    "list_versions",
    "live_version",
    "load_bundle",
    "load_live",
    "prune",
    "publish",
]

