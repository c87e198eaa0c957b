"""Publishing a model version whole (temporary directory, fsync, rename, then LIVE) and pruning old ones."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from model.atomic import atomic_write_text, fsync_dir
from model.bundle.manifest import (
    ENCODERS,
    HEADS,
    LIVE,
    MANIFEST,
    PROPAGATED,
    STAMP,
    VERSIONS,
    Manifest,
    json_default,
    library_versions,
    list_versions,
    live_version,
)
from model.encoder.backbone import encoder_version
from model.errors import BundleError, ConfigError
from model.features.extractor import ENCODER_FEATURES, features_dim
from model.heads.heads import TaxonomyHeads
from model.propagation_choice import PropagatedTable
from model.taxonomy import Taxonomy

__all__ = ["prune", "publish"]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _new_version(root: Path, salt: bytes) -> tuple[str, datetime]:
    """A version name later than every existing one (bumped by a second when the clock has not moved on), and its
    creation time: the clock, to the microsecond. Under a fast stream of trainings (more than one a second) the
    bumped names run ahead of the clock; the creation time does not."""
    clock = datetime.now(timezone.utc)
    now = clock.replace(microsecond=0)
    existing = list_versions(root)
    if existing:
        last = datetime.strptime(existing[-1].split("-")[0], STAMP).replace(tzinfo=timezone.utc)
        if now <= last:
            now = last + timedelta(seconds=1)
    digest = hashlib.sha256(salt + str(time.time_ns()).encode() + uuid.uuid4().bytes).hexdigest()[:6]
    return f"{now.strftime(STAMP)}-{digest}", clock


def _contiguous(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def publish(
    root: Path | str,
    taxonomy: Taxonomy,
    encoder_cfg: Any,
    backbone_state: Mapping[str, torch.Tensor],
    heads: TaxonomyHeads,
    temperature: float,
    metrics: Mapping[str, Any],
    data_fingerprint: str,
    extra: Mapping[str, Any] | None = None,
    counts: Mapping[str, Any] | None = None,
    features: Mapping[str, Any] | None = None,
    propagated: PropagatedTable | None = None,
) -> Manifest:
    """Write a new model version and make it live.

    Args:
        root: the model root (created if missing).
        taxonomy: the label tree the heads were trained for.
        encoder_cfg: the ``EncoderConfig`` of the backbone (anything with ``to_dict()`` and ``out_dim``).
        backbone_state: the backbone ``state_dict``.
        heads: the trained heads.
        temperature: calibration temperature.
        metrics: evaluation metrics (JSON-able).
        data_fingerprint: hash of the training pairs (see :func:`data_fingerprint`).
        extra: trainer's records (JSON-able).
        counts: numbers behind the version; default ``{"labelled": metrics["n_labelled"]}`` when known.
        features: what the heads read (``model.features.extractor``); default the encoder's embeddings.
        propagated: the propagated table of a version chosen as label propagation or its blend (:data:`PROPAGATED`).

    Returns:
        The manifest of the new live version.

    Raises:
        BundleError: heads that do not fit the taxonomy or the encoder (nothing is written then).
    """
    root = Path(root)
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    if list(heads.num_classes) != num_classes:
        raise BundleError(
            f"The heads have {heads.num_classes} classes per level but the taxonomy needs {num_classes}; "
            "retrain the heads for this taxonomy before publishing."
        )
    features = dict(features or ENCODER_FEATURES)
    out_dim = features_dim(features, encoder_cfg) if hasattr(encoder_cfg, "out_dim") else heads.in_dim
    if heads.in_dim != out_dim:
        raise BundleError(
            f"The heads take {heads.in_dim}-d embeddings but the features ({features['kind']}) give {out_dim}-d; "
            "retrain the heads on these features."
        )
    if not temperature > 0:
        raise BundleError(f"Temperature {temperature} is not positive; publish the value fit_temperature returned.")
    (root / VERSIONS).mkdir(parents=True, exist_ok=True)
    (root / ENCODERS).mkdir(parents=True, exist_ok=True)

    backbone = _contiguous(backbone_state)
    enc_version = encoder_version(backbone)
    enc_file = root / ENCODERS / f"{enc_version}.safetensors"
    if not enc_file.exists():
        tmp = root / ENCODERS / f".{enc_version}.{uuid.uuid4().hex[:8]}.tmp"
        save_file(backbone, str(tmp))
        _fsync_file(tmp)
        os.replace(tmp, enc_file)
        fsync_dir(enc_file.parent)

    version, created = _new_version(root, enc_version.encode())
    training = heads.train_config.to_dict() if heads.train_config is not None else None
    default_counts = {"labelled": metrics["n_labelled"]} if "n_labelled" in metrics else {}
    manifest = Manifest(
        version=version,
        created=created.isoformat(),
        taxonomy=taxonomy.to_json(),
        taxonomy_hash=taxonomy.hash(),
        encoder=encoder_cfg.to_dict() if hasattr(encoder_cfg, "to_dict") else dict(encoder_cfg),
        encoder_version=enc_version,
        embedding_dim=heads.in_dim,
        heads={"architecture": heads.architecture(), "training": training},
        num_classes=num_classes,
        temperature=float(temperature),
        metrics=json.loads(json.dumps(dict(metrics), default=json_default)),
        data_fingerprint=str(data_fingerprint),
        counts=dict(counts) if counts is not None else default_counts,
        extra=json.loads(json.dumps(dict(extra or {}), default=json_default)),
        libraries=library_versions(),
        features=features,
    )
    tmp_dir = root / VERSIONS / f".tmp-{version}-{uuid.uuid4().hex[:6]}"
    tmp_dir.mkdir()
    try:
        save_file(_contiguous(heads.state_dict()), str(tmp_dir / HEADS))
        _fsync_file(tmp_dir / HEADS)
        if propagated is not None:
            with open(tmp_dir / PROPAGATED, "wb") as fh:
                np.savez(fh, kind=np.array(propagated.kind), hashes=np.array(propagated.hashes, dtype=str),
                         probs=np.asarray(propagated.probs, dtype=np.float16))
            _fsync_file(tmp_dir / PROPAGATED)
        with open(tmp_dir / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(tmp_dir)
        os.rename(tmp_dir, root / VERSIONS / version)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    fsync_dir(root / VERSIONS)
    atomic_write_text(root / LIVE, version + "\n", durable=True)
    return manifest


def prune(root: Path | str, keep: int = 3) -> list[str]:
    """Remove all but the newest ``keep`` versions (never the live one), unused encoders and stale temporaries.

    Encoder files and temporaries younger than 10 minutes / 1 hour stay (a publish may be writing them).

    Returns:
        The removed version names.
    """
    root = Path(root)
    if keep < 1:
        raise ConfigError(f"prune keeps at least one version (got keep={keep}).")
    versions = list_versions(root)
    live = live_version(root)
    keep_set = set(versions[-keep:]) | ({live} if live else set())
    removed = [v for v in versions if v not in keep_set]
    for v in removed:
        shutil.rmtree(root / VERSIONS / v, ignore_errors=True)
    base = root / VERSIONS
    if base.is_dir():
        for p in base.iterdir():  # leftovers of publishes that crashed more than an hour ago
            if p.name.startswith(".tmp-") and time.time() - p.stat().st_mtime > 3600:
                shutil.rmtree(p, ignore_errors=True)
    used = set()
    for v in list_versions(root):
        try:
            used.add(json.loads((root / VERSIONS / v / MANIFEST).read_text(encoding="utf-8"))["encoder_version"])
        except (OSError, ValueError, KeyError):
            continue
    enc_dir = root / ENCODERS
    if enc_dir.is_dir() and used:
        for f in enc_dir.glob("*.safetensors"):
            if f.stem not in used and time.time() - f.stat().st_mtime > 600:  # not one a publish just wrote
                f.unlink(missing_ok=True)
    return removed
