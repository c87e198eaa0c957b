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

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.config import EncoderConfig
from model.errors import BundleError, ConfigError, TaxonomyError
from model.features.extractor import ENCODER_FEATURES, features_dim, features_version
from model.heads.heads import TaxonomyHeads
from model.taxonomy import Taxonomy

__all__ = [
    "ENCODERS",
    "FORMAT",
    "HEADS",
    "LIVE",
    "MANIFEST",
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

LIVE = "LIVE"
VERSIONS = "versions"
ENCODERS = "encoders"
MANIFEST = "manifest.json"
HEADS = "heads.safetensors"
FORMAT = 1
_STAMP = "%Y%m%dT%H%M%S"


@dataclass(frozen=True)
class Manifest:
    """Everything about a model version except its weights (``manifest.json``).

    Attributes:
        version: sortable name, ``<UTC timestamp>-<6 hex>``.
        created: ISO-8601 UTC creation time.
        taxonomy: ``Taxonomy.to_json()``; ``taxonomy_hash`` its ``Taxonomy.hash()``.
        encoder: ``EncoderConfig.to_dict()``; ``encoder_version`` the content hash of the backbone weights. Every
            version holds the project's encoder, also when its heads read pixel features: later trainings
            continue from it.
        embedding_dim: D, the heads input (the encoder output, or the pixel feature dimension).
        heads: ``{"architecture": TaxonomyHeads.architecture(), "training": HeadsConfig.to_dict() | None}``.
        num_classes: classes per level of the heads.
        temperature: calibration temperature of the path probabilities.
        metrics: out-of-fold evaluation (``model.evaluation``).
        data_fingerprint: hash of the sorted (content hash, path) training pairs.
        counts: numbers of images / labels behind the version.
        extra: anything the trainer records (training policy, consensus, pretraining decision ...).
        libraries: versions of torch, torchvision, lightly, taxomoco that wrote it.
        format: layout version of the bundle.
        features: what the heads read (``model.features.extractor``): ``{"kind": "encoder"}`` (the default, and
            what versions without the field read) or ``{"kind": "pixels", "config": {...}}``.
    """

    version: str
    created: str
    taxonomy: list[Any]
    taxonomy_hash: str
    encoder: dict[str, Any]
    encoder_version: str
    embedding_dim: int
    heads: dict[str, Any]
    num_classes: list[int]
    temperature: float
    metrics: dict[str, Any]
    data_fingerprint: str
    counts: dict[str, Any] = field(default_factory=dict[str, Any])
    extra: dict[str, Any] = field(default_factory=dict[str, Any])
    libraries: dict[str, Any] = field(default_factory=dict[str, Any])
    format: int = FORMAT
    features: dict[str, Any] = field(default_factory=lambda: dict(ENCODER_FEATURES))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=_json_default)

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> Manifest:
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as exc:
            raise BundleError(f"{where} is not a valid manifest ({exc}); delete the version and retrain.") from None


@dataclass
class ModelBundle:
    """A loaded, validated model version."""

    manifest: Manifest
    taxonomy: Taxonomy
    encoder_cfg: Any  # model.encoder.backbone.EncoderConfig
    backbone_state: dict[str, torch.Tensor]
    heads: TaxonomyHeads
    temperature: float
    path: Path

    @property
    def features(self) -> dict[str, Any]:
        """What the heads read (see :attr:`Manifest.features`)."""
        return dict(self.manifest.features)

    @property
    def features_version(self) -> str:
        """The id the heads' input features are cached under (the encoder version for encoder features)."""
        return features_version(self.manifest.features, self.manifest.encoder_version)


def _json_default(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _library_versions() -> dict[str, str]:

    out = {}
    for name in ("torch", "torchvision", "lightly", "taxomoco"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def data_fingerprint(pairs: Iterable[tuple[str, tuple[str, ...] | list[str]]]) -> str:
    """A short hash of the training data: the sorted (image content hash, path) pairs."""
    rows = sorted([h, list(p)] for h, p in pairs)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) do not open directories; nothing to sync there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _new_version(root: Path, salt: bytes) -> tuple[str, datetime]:
    """A version name later than every existing one (bumped by a second when the clock has not moved on)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    existing = list_versions(root)
    if existing:
        last = datetime.strptime(existing[-1].split("-")[0], _STAMP).replace(tzinfo=timezone.utc)
        if now <= last:
            now = last + timedelta(seconds=1)
    digest = hashlib.sha256(salt + str(time.time_ns()).encode() + uuid.uuid4().bytes).hexdigest()[:6]
    return f"{now.strftime(_STAMP)}-{digest}", now


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
        _fsync_dir(enc_file.parent)

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
        metrics=json.loads(json.dumps(dict(metrics), default=_json_default)),
        data_fingerprint=str(data_fingerprint),
        counts=dict(counts) if counts is not None else default_counts,
        extra=json.loads(json.dumps(dict(extra or {}), default=_json_default)),
        libraries=_library_versions(),
        features=features,
    )
    tmp_dir = root / VERSIONS / f".tmp-{version}-{uuid.uuid4().hex[:6]}"
    tmp_dir.mkdir()
    try:
        save_file(_contiguous(heads.state_dict()), str(tmp_dir / HEADS))
        _fsync_file(tmp_dir / HEADS)
        with open(tmp_dir / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp_dir)
        os.rename(tmp_dir, root / VERSIONS / version)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _fsync_dir(root / VERSIONS)
    _write_text_atomic(root / LIVE, version + "\n")
    return manifest


def live_version(root: Path | str) -> str | None:
    """The live version's name (reads the pointer file only), or None before the first publish."""
    try:
        text = (Path(root) / LIVE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return text or None


def list_versions(root: Path | str) -> list[str]:
    """Complete versions under ``root``, oldest first (temporary and partial directories are skipped)."""
    base = Path(root) / VERSIONS
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())


def _load_state(path: Path, what: str) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise BundleError(f"The {what} file {path} is missing: the bundle is partial. Publish a new version.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(f"The {what} file {path} cannot be read ({exc}); publish a new version.") from None


def _check_heads(state: Mapping[str, torch.Tensor], manifest: Manifest, where: Path) -> TaxonomyHeads:
    arch = dict(manifest.heads.get("architecture", {}))
    if arch.get("num_classes") != manifest.num_classes or arch.get("in_dim") != manifest.embedding_dim:
        raise BundleError(
            f"{where}: the heads architecture {arch} disagrees with the manifest (num_classes "
            f"{manifest.num_classes}, embedding_dim {manifest.embedding_dim}); the bundle is inconsistent."
        )
    try:
        heads = TaxonomyHeads(**arch)
    except (TypeError, ConfigError) as exc:
        raise BundleError(f"{where}: cannot rebuild the heads from {arch} ({exc}).") from None
    expected = heads.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or wrong:
        raise BundleError(
            f"{where}: heads weights do not match the manifest (num_classes {manifest.num_classes}, embedding_dim "
            f"{manifest.embedding_dim}): missing {missing[:4]}, unexpected {unexpected[:4]}, shapes {wrong[:4]}. "
            "The files come from different versions; publish a new version."
        )
    heads.load_state_dict(dict(state))
    return heads.eval()


@lru_cache(maxsize=8)
def _backbone_shapes(cfg: Any) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of the backbone ``cfg`` describes (built once per config, on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build_backbone(cfg).state_dict().items()}


def _check_encoder(state: dict[str, torch.Tensor], manifest: Manifest, where: Path) -> Any:

    actual = encoder_version(state)
    if actual != manifest.encoder_version:
        raise BundleError(
            f"{where}: the encoder weights hash to {actual}, not the manifest's {manifest.encoder_version}; the "
            "encoder file is corrupt or replaced. Publish a new version (or restore the file)."
        )
    try:  # the weights are in the bundle: the initial-weights file of the training run is not needed again
        cfg = EncoderConfig.from_dict({**manifest.encoder, "init_weights": None})
    except ConfigError as exc:
        raise BundleError(f"{where}: the manifest's encoder config is invalid ({exc}).") from None
    try:
        dim = features_dim(manifest.features, cfg)
    except ConfigError as exc:
        raise BundleError(f"{where}: the manifest's features {manifest.features} are invalid ({exc}).") from None
    if dim != manifest.embedding_dim:
        raise BundleError(
            f"{where}: the {manifest.features.get('kind')} features are {dim}-d but the heads take "
            f"{manifest.embedding_dim}-d; the bundle mixes features and heads of different models. Retrain the heads."
        )
    expected = _backbone_shapes(cfg)
    bad = sorted(set(expected) ^ set(state)) + [
        k for k in expected if k in state and expected[k] != tuple(state[k].shape)
    ]
    if bad:
        raise BundleError(
            f"{where}: the encoder weights do not fit the {cfg.arch.value} backbone ({bad[:4]}); publish a new version."
        )
    return cfg


def _load_version(root: Path, version: str) -> ModelBundle:
    vdir = root / VERSIONS / version
    if not vdir.is_dir():
        raise BundleError(f"Model version {version} does not exist in {root / VERSIONS}; versions: "
                          f"{list_versions(root)[-5:]}.")
    mpath = vdir / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{vdir} has no {MANIFEST}: the version is partial. Publish a new version.")
    manifest = Manifest.from_json(mpath.read_text(encoding="utf-8"), str(mpath))
    if manifest.format != FORMAT:
        raise BundleError(f"{vdir} has bundle format {manifest.format}; this taxomoco reads format {FORMAT}.")
    try:
        taxonomy = Taxonomy.from_json(manifest.taxonomy)
    except (TaxonomyError, KeyError, TypeError) as exc:
        raise BundleError(f"{mpath}: the stored taxonomy is invalid ({exc}).") from None
    if taxonomy.hash() != manifest.taxonomy_hash:
        raise BundleError(
            f"{mpath}: the taxonomy hashes to {taxonomy.hash()[:12]}, not the manifest's "
            f"{manifest.taxonomy_hash[:12]}; the manifest was edited. Publish a new version."
        )
    num_classes = [taxonomy.num_classes(k) for k in range(taxonomy.depth)]
    if num_classes != manifest.num_classes:
        raise BundleError(
            f"{mpath}: the taxonomy has {num_classes} classes per level but the manifest says "
            f"{manifest.num_classes}; publish a new version."
        )
    heads = _check_heads(_load_state(vdir / HEADS, "heads"), manifest, vdir)
    backbone = _load_state(root / ENCODERS / f"{manifest.encoder_version}.safetensors", "encoder")
    cfg = _check_encoder(backbone, manifest, vdir)
    if not manifest.temperature > 0:
        raise BundleError(f"{mpath}: temperature {manifest.temperature} is not positive.")
    return ModelBundle(manifest, taxonomy, cfg, backbone, heads, float(manifest.temperature), vdir)


def load_bundle(root: Path | str, version: str | None = None) -> ModelBundle:
    """Load and validate a model version (the live one by default).

    Args:
        root: the model root.
        version: a version name, or None for the live version.

    Raises:
        BundleError: no live version, a missing or partial version, or files that disagree with the
            manifest (heads shapes, taxonomy hash, embedding dimension, encoder hash).
    """
    root = Path(root)
    if version is not None:
        return _load_version(root, version)
    for attempt in range(3):  # a publish + prune may retire the version between reading LIVE and its files
        live = live_version(root)
        if live is None:
            raise BundleError(f"No model has been published in {root} yet; train one first.")
        try:
            return _load_version(root, live)
        except BundleError:
            if attempt == 2 or live_version(root) == live:
                raise
    raise AssertionError("unreachable")


def load_live(root: Path | str) -> ModelBundle:
    """The live model version (see :func:`load_bundle`)."""
    return load_bundle(root)


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

