"""The method on folders of images, without Label Studio: what ``taxomoco pretrain|train|evaluate|predict|similar`` run.

A labelled folder tree names taxonomy paths (``IMAGES/wild/Bear/001.png`` → ``("wild", "Bear")``). An encoder
directory (written by ``pretrain``, ``ml_backend.encoder_dir``) holds ``encoder.safetensors`` + ``encoder.json``; a
model directory holds published versions (``model.bundle``), the embedding cache and ``neighbors/<encoder
version>/``, the kNN index of the trained (and ``similar --among``) images keyed by absolute path.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ml_backend.configs import encoder_config, pretrain_config
from ml_backend.encoder_dir import load_encoder, save_encoder
from ml_backend.folder_embeddings import embed_files, file_hashes, folder_features
from ml_backend.settings import Settings
from model.bundle import data_fingerprint, load_live, publish
from model.data import scan_images, scan_labelled_folder
from model.encoder.backbone import build_backbone
from model.encoder.cache import embed_through_cache
from model.encoder.config import EncoderConfig
from model.errors import DataError
from model.evaluation import evaluate
from model.features.extractor import ENCODER_FEATURES, pixel_features_spec
from model.heads.candidates import FeatureSource, parse_candidates
from model.heads.heads import HeadsConfig
from model.heads.selection import Selection, select_and_fit
from model.heads.training import heads_logits, labelled_rows
from model.images import content_hash
from model.neighbors.index import NeighborIndex, load_index
from model.paired_gain import GainRule
from model.predictor import Predictor
from model.report import write_report
from model.ssl.recipe import summarize_images
from model.taxonomy import Taxonomy

__all__ = [
    "evaluate_folder",
    "predict_files",
    "pretrain_folder",
    "run_command",
    "similar_files",
    "train_folder",
]

log = logging.getLogger(__name__)

NEIGHBORS = "neighbors"
"""Folder of a model directory holding one kNN index per encoder version, keyed by absolute image path."""


def _unlabelled(args: argparse.Namespace) -> list[Path]:
    files: list[Path] = []
    if getattr(args, "unlabelled", None):
        files += scan_images(args.unlabelled)
    if getattr(args, "unlabelled_list", None):
        lines = [ln.strip() for ln in args.unlabelled_list.read_text().splitlines()]
        files += [Path(ln) for ln in lines if ln and not ln.startswith("#")]
    return files


def _encoder_cfg(settings: Settings, files: Sequence[Path]) -> EncoderConfig:
    return encoder_config(settings, summarize_images(list(files)))


def pretrain_folder(args: argparse.Namespace, settings: Settings, files: Sequence[Path] | None = None) -> Path:
    """``taxomoco pretrain``: MoCo v2 on every image under ``images_dir`` → an encoder directory."""
    from model.ssl.pretrain import pretrain  # Lightning: 2-3 s of imports, paid only by the commands that pretrain

    files = list(files) if files is not None else scan_images(args.images_dir)
    if not files:
        raise DataError(f"No images found under {args.images_dir}; point the command at a folder of .png/.jpg files.")
    out: Path = args.out
    summary = summarize_images(files)
    cfg = encoder_config(settings, summary)
    run_cfg = pretrain_config(settings, len(files), summary)
    print(f"recipe: {len(files)} images, median side {summary.median_side} px, "
          f"{'grayscale' if summary.grayscale else 'colour'} -> input {cfg.input_size} px, "
          f"crops >= {run_cfg.augment.min_scale:.0%}, budget {run_cfg.max_minutes or 'none'} min, "
          f"epoch cap {run_cfg.epochs}")
    result = pretrain(files, cfg, run_cfg, out, resume=not getattr(args, "no_resume", False))
    version = save_encoder(out, cfg, result.backbone_state)
    plan = result.plan
    first, last = (result.quality[0], result.quality[-1]) if result.quality else (None, None)
    print(
        f"pretrained encoder {version}: {result.steps_done}/{plan.steps if plan else '?'} planned steps "
        f"({result.epochs_done} epochs, limited by {plan.limited_by if plan else '?'}), "
        f"{result.images_per_second:.0f} images/s, {len(result.skipped)} unreadable images skipped"
    )
    if first is not None and last is not None:
        verdict = {True: "learned", False: "DID NOT visibly learn", None: "not enough measurements"}[result.learned]
        print(f"view retrieval (label-free quality) {first.view_retrieval:.3f} -> {last.view_retrieval:.3f}: {verdict}")
    print(f"loss and quality curves: {out / 'loss.png'}")
    return out


def _print_choice(selection: Selection) -> None:
    print(f"model choice: {selection.chosen.name} ({selection.reason})")
    for name, score in selection.scores.items():
        print(f"  {name}: hierarchical F1 {score.hf_mean:.3f} ± {score.hf_std:.3f} over {selection.folds} folds")


def train_folder(args: argparse.Namespace, settings: Settings) -> str:
    """``taxomoco train``: heads on a labelled folder tree (optionally pretraining first) → a published version."""
    labelled = scan_labelled_folder(args.images_dir)
    files = [f for f, _ in labelled]
    paths = [p for _, p in labelled]
    taxonomy = Taxonomy.from_paths(sorted(set(paths)))
    if args.encoder is not None:
        cfg, state, _ = load_encoder(args.encoder)
    elif args.pretrain:
        args.out = args.models / "pretrain"
        pretrain_folder(args, settings, files + _unlabelled(args))
        cfg, state, _ = load_encoder(args.out)
    else:
        log.warning("No --encoder and no --pretrain: the heads train on a randomly initialised encoder (a baseline).")
        cfg = _encoder_cfg(settings, files)
        state = build_backbone(cfg).state_dict()
    candidates = parse_candidates([c.strip() for c in (args.candidates or "").split(",") if c.strip()]
                                  or list(Settings.model_candidates))
    candidates = [c for c in candidates if c.features is not FeatureSource.PREVIOUS]  # one encoder on folders
    features, ok = folder_features(files, cfg, state, args.models / "cache", settings.device,
                                    pixels=any(c.features is FeatureSource.PIXELS for c in candidates))
    if not ok.all():
        print(f"{int((~ok).sum())} unreadable images skipped")
    keep = np.flatnonzero(ok)
    kept_paths = [paths[i] for i in keep]
    _, targets, _ = labelled_rows(features[FeatureSource.ENCODER][keep], kept_paths, taxonomy)
    selection, heads = select_and_fit({s: f[keep] for s, f in features.items()}, candidates, targets, taxonomy,
                                      folds=args.folds or Settings.cv_folds, heads_cfg=HeadsConfig(),
                                      rule=GainRule(settings.model_choice))
    metrics = {**selection.cv.metrics, "model_choice": selection.to_dict()}
    hashes = file_hashes([files[i] for i in keep])
    fingerprint = data_fingerprint(zip(hashes, kept_paths))
    spec = pixel_features_spec() if selection.chosen.features is FeatureSource.PIXELS else ENCODER_FEATURES
    manifest = publish(
        args.models,
        taxonomy=taxonomy,
        encoder_cfg=cfg,
        backbone_state=state,
        heads=heads,
        temperature=selection.cv.temperature,
        metrics=metrics,
        data_fingerprint=fingerprint,
        extra={"source": str(args.images_dir), "n_images": len(files), "skipped_images": int((~ok).sum()),
               "model": selection.chosen.name, "model_choice": selection.to_dict()},
        features=spec,
    )
    _index_files(args.models, manifest.encoder_version, [files[i] for i in keep],
                 features[FeatureSource.ENCODER][keep])
    _print_choice(selection)
    _print_metrics(metrics, f"cross-validated ({selection.chosen.name})")
    if args.report is not None:
        loss_csv = args.models / "pretrain" / "loss.csv"
        page = write_report(args.report, metrics, taxonomy, loss_csv=loss_csv if loss_csv.exists() else None)
        print(f"report: {page}")
    print(f"published model version {manifest.version} in {args.models}")
    return manifest.version


def evaluate_folder(args: argparse.Namespace, settings: Settings) -> dict:
    """``taxomoco evaluate``: the live model on a labelled folder tree → JSON + PNG + HTML report."""
    bundle = load_live(args.models)
    labelled = scan_labelled_folder(args.images_dir)
    files = [f for f, _ in labelled]
    predictor = Predictor(bundle, args.models / "cache", device=settings.device)  # the version's own features
    emb, ok = embed_through_cache(predictor.embedder, predictor.cache, list(files), file_hashes(files), progress=True)
    keep = np.flatnonzero(ok)
    targets = bundle.taxonomy.encode_many([labelled[i][1] for i in keep])
    logits = heads_logits(bundle.heads, torch.from_numpy(emb[keep]))
    metrics = evaluate(logits, targets, bundle.taxonomy, bundle.temperature)
    metrics["model_version"] = bundle.manifest.version
    metrics["skipped_images"] = int((~ok).sum())
    page = write_report(args.out, metrics, bundle.taxonomy)
    _print_metrics(metrics, f"model {bundle.manifest.version} on {len(keep)} images")
    print(f"report: {page}")
    return metrics


def predict_files(args: argparse.Namespace, settings: Settings) -> list[dict]:
    """``taxomoco predict``: one JSON line per image (path, score, per-level scores) on stdout."""
    bundle = load_live(args.models)
    predictor = Predictor(bundle, args.models / "cache", device=settings.device)
    items: list[tuple[bytes, str] | None] = []
    errors: dict[int, str] = {}
    for i, f in enumerate(args.images):
        try:
            data = f.read_bytes()
            items.append((data, content_hash(data)))
        except OSError as exc:
            items.append(None)
            errors[i] = f"cannot read {f}: {exc.strerror or exc}"
    # one cache read per image; only images whose embedding is not cached are decoded
    preds, decode_errors = predictor.predict_encoded(items, leafs_only=not args.all_levels,
                                                     prefix_threshold=settings.prefix_threshold)
    errors.update(decode_errors)
    rows = []
    for i, (f, pred) in enumerate(zip(args.images, preds)):
        row: dict = {"image": str(f), "model_version": predictor.version}
        if pred is None:
            row["error"] = errors.get(i, "unreadable")
        else:
            row.update(path=list(pred.path), score=round(pred.score, 4), level_scores=[round(s, 4) for s in pred.level_scores])
        rows.append(row)
        print(json.dumps(row))
    return rows


def _index_files(models: Path, encoder: str, files: Sequence[Path], emb: np.ndarray) -> NeighborIndex:
    """Add image files (keyed by absolute path) to the model directory's kNN index of ``encoder``."""
    directory = models / NEIGHBORS / encoder
    try:
        index = load_index(directory)
    except DataError:
        index = NeighborIndex(emb.shape[1], encoder)
    if index.add([str(f.resolve()) for f in files], emb):
        index.save(directory)
    return index


def similar_files(args: argparse.Namespace, settings: Settings) -> list[dict]:
    """``taxomoco similar IMAGE ... --models DIR [--among FOLDER]``: one JSON line per query image with its ``k``
    most similar images (path and cosine similarity) among the indexed ones (``--among`` adds a folder first)."""
    bundle = load_live(args.models)
    cfg, state, encoder = bundle.encoder_cfg, bundle.backbone_state, bundle.manifest.encoder_version
    cache = args.models / "cache"
    if args.among is not None:
        files = scan_images(args.among)
        if not files:
            raise DataError(f"No images found under {args.among}; point --among at a folder of .png/.jpg files.")
        try:
            index = load_index(args.models / NEIGHBORS / encoder)
        except DataError:
            index = NeighborIndex(bundle.manifest.embedding_dim, encoder)
        new = [f for f in files if str(f.resolve()) not in index]
        if new:
            emb, ok = embed_files(new, cfg, state, cache, settings.device)
            index = _index_files(args.models, encoder, [f for f, good in zip(new, ok) if good], emb[ok])
    else:
        try:
            index = load_index(args.models / NEIGHBORS / encoder)
        except DataError:
            raise DataError(f"{args.models} has no image index for its model: `taxomoco train` builds one from the "
                            "labelled images, or pass --among FOLDER to index a folder.") from None
    emb, ok = embed_files(list(args.images), cfg, state, cache, settings.device)
    rows = []
    for f, vector, good in zip(args.images, emb, ok):
        row: dict = {"image": str(f), "model_version": bundle.manifest.version}
        if not good:
            row["error"] = "unreadable image"
        else:
            sims, found = index.search(vector[None, :], args.k + 1)  # (1, k+1)
            me = str(Path(f).resolve())
            hits = [(index.key(int(r)), float(s)) for s, r in zip(sims[0], found[0]) if r >= 0]
            row["similar"] = [{"path": key, "score": round(s, 4)} for key, s in hits if key != me][:args.k]
        rows.append(row)
        print(json.dumps(row))
    return rows


def _print_metrics(metrics: dict, title: str) -> None:
    levels = metrics.get("levels") or []
    if not levels:
        print(f"{title}: too few labels for an evaluation")
        return
    print(f"{title}:")
    for k, lv in enumerate(levels):
        print(f"  level {k + 1}: accuracy {lv['accuracy']:.3f}  macro-F1 {lv['macro']['f1']:.3f}")
    if "hierarchical" in metrics:
        print(f"  hierarchical F1 {metrics['hierarchical']['hF']:.3f}")
    if "calibration" in metrics:
        print(f"  expected calibration error {metrics['calibration']['ece']:.3f}")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch a model command of the CLI."""
    if args.command == "pretrain":
        pretrain_folder(args, settings)
    elif args.command == "train":
        train_folder(args, settings)
    else:
        {"evaluate": evaluate_folder, "predict": predict_files, "similar": similar_files}[args.command](args, settings)
    return 0
