"""Loading a model version: only what is complete and agrees with its manifest."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from model.bundle.manifest import (
    ENCODERS,
    FORMAT,
    HEADS,
    MANIFEST,
    PROPAGATED,
    VERSIONS,
    Manifest,
    ModelBundle,
    list_versions,
    live_version,
)
from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.config import EncoderConfig
from model.errors import BundleError, ConfigError, DataError, TaxonomyError
from model.features.extractor import features_dim
from model.heads.heads import TaxonomyHeads
from model.propagation_choice import PropagatedTable
from model.taxonomy import Taxonomy

__all__ = ["load_bundle", "load_live"]


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
    return ModelBundle(manifest, taxonomy, cfg, backbone, heads, float(manifest.temperature), vdir,
                       _load_propagated(vdir / PROPAGATED, taxonomy))


def _load_propagated(path: Path, taxonomy: Taxonomy) -> PropagatedTable | None:
    """The version's propagated table (:data:`PROPAGATED`), or None when it has none."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            table = PropagatedTable(str(data["kind"]), [str(h) for h in data["hashes"]],
                                    np.asarray(data["probs"], dtype=np.float32))
    except (OSError, ValueError, KeyError, DataError) as exc:
        raise BundleError(f"{path} is damaged ({exc}); delete the version and retrain.") from None
    paths = len(taxonomy.candidate_paths(leafs_only=True)[0])
    if table.probs.ndim != 2 or (len(table.probs) and table.probs.shape[1] != paths):
        raise BundleError(f"{path} holds probabilities of shape {table.probs.shape}, not (M, {paths}) for the "
                          "taxonomy's full paths; delete the version and retrain.")
    return table


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
