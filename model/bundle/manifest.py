"""What a model version is on disk: the layout's names, :class:`Manifest`, :class:`ModelBundle` (a loaded version),
the training data's fingerprint, and the LIVE pointer and version list readers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from model.errors import BundleError
from model.features.extractor import ENCODER_FEATURES, features_version
from model.heads.heads import TaxonomyHeads
from model.propagation_choice import PropagatedTable
from model.taxonomy import Taxonomy

__all__ = [
    "ENCODERS",
    "FORMAT",
    "HEADS",
    "LIVE",
    "MANIFEST",
    "PROPAGATED",
    "STAMP",
    "VERSIONS",
    "Manifest",
    "ModelBundle",
    "data_fingerprint",
    "json_default",
    "library_versions",
    "list_versions",
    "live_version",
]

LIVE = "LIVE"
VERSIONS = "versions"
ENCODERS = "encoders"
MANIFEST = "manifest.json"
HEADS = "heads.safetensors"
PROPAGATED = "propagated.npz"
"""A version chosen as label propagation (or its blend with the heads) also holds its propagated table
(``model.propagation_choice.PropagatedTable``): ``kind``, ``hashes`` ``(M,)``, ``probs`` ``(M, P_full)`` float16."""
FORMAT = 1
STAMP = "%Y%m%dT%H%M%S"


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
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=json_default)

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
    propagated: PropagatedTable | None = None

    @property
    def features(self) -> dict[str, Any]:
        """What the heads read (see :attr:`Manifest.features`)."""
        return dict(self.manifest.features)

    @property
    def features_version(self) -> str:
        """The id the heads' input features are cached under (the encoder version for encoder features)."""
        return features_version(self.manifest.features, self.manifest.encoder_version)


def json_default(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def library_versions() -> dict[str, str]:

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
