"""The model choice: candidates (encoder + MLP / prototypes, pixels + logistic regression) compared by
cross-validated hierarchical F1 on real images, and whichever wins served through the same Predictor."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.bundle import load_live, publish
from model.encoder.backbone import build_backbone
from model.encoder.config import EncoderConfig
from model.encoder.embedder import Embedder
from model.features.extractor import FeatureKind, pixel_features_spec
from model.features.pixels import PixelConfig, PixelFeatures
from model.heads.candidates import CANDIDATES, FeatureSource, parse_candidates
from model.heads.decode import decode
from model.heads.linear import UNSEEN_BIAS, logistic_heads, prototype_heads
from model.heads.selection import TIE_MARGIN, path_folds, select, select_and_fit
from model.heads.training import heads_logits
from model.images import content_hash
from model.predictor import Predictor
from model.taxonomy import Taxonomy

TAX = Taxonomy.from_nested({"A": ["left", "right"], "B": ["left", "right"]})
LEAVES = [leaf.path for leaf in TAX.leaves()]
CFG = EncoderConfig(input_size=64)


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


def quadrant_image(path: tuple[str, str], rng: np.random.Generator) -> Image.Image:
    """Heavy pixel noise; the label's quadrant (A = top, B = bottom; left/right) is slightly brighter.

    A linear model on downscaled pixels (which average the noise away) separates these; a randomly initialised
    CNN, whose global pooling sees mostly noise energy, barely does."""
    img = 100 + rng.normal(0, 90, (64, 64))
    y0 = 0 if path[0] == "A" else 32
    x0 = 0 if path[1] == "left" else 32
    img[y0:y0 + 32, x0:x0 + 32] += 35
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB")


def stripes_image(path: tuple[str, str], rng: np.random.Generator) -> Image.Image:
    """Fine stripes at a random phase: A horizontal, B vertical; left period 4 px, right 6 px. Downscaled to
    16 x 16 they average to flat grey (pixels see nothing); a CNN's oriented filters tell them apart."""
    period = 4 if path[1] == "left" else 6
    yy, xx = np.mgrid[0:64, 0:64]
    coord = yy if path[0] == "A" else xx
    on = (coord + rng.integers(0, period)) % period < period // 2
    img = np.where(on, 200, 50) + rng.integers(0, 20, (64, 64))
    return Image.fromarray(img.astype(np.uint8)).convert("RGB")


def random_encoder() -> Embedder:
    torch.manual_seed(0)
    return Embedder(build_backbone(CFG), CFG, device="cpu")


def dataset(make, n: int = 32, seed: int = 0) -> tuple[list[Image.Image], list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    paths = [LEAVES[i % len(LEAVES)] for i in range(n)]
    return [make(p, rng) for p in paths], paths


def features_of(images: list[Image.Image]) -> dict[FeatureSource, np.ndarray]:
    pix, ok = PixelFeatures().embed_with_mask(images)
    enc, ok2 = random_encoder().embed_with_mask(images)
    assert ok.all() and ok2.all()
    return {FeatureSource.PIXELS: pix, FeatureSource.ENCODER: enc}


def test_pixels_win_where_only_pixels_separate_the_classes_and_the_pixel_model_serves(tmp_path: Path) -> None:
    images, paths = dataset(quadrant_image)
    targets = TAX.encode_many(paths)
    selection, heads = select_and_fit(features_of(images), list(CANDIDATES.values()), targets, TAX, folds=3)
    scores = {n: s.hf_mean for n, s in selection.scores.items()}
    assert selection.chosen.name == "pixels+linear", selection.reason
    assert scores["pixels+linear"] > max(scores["encoder+mlp"], scores["encoder+prototypes"]) + 0.1, scores
    assert "highest cross-validated hierarchical F1" in selection.reason
    summary = selection.to_dict()
    json.dumps(summary)
    assert summary["folds"] == 3 and summary["skipped"] == {"previous-encoder+mlp": "no previous features in this training"}
    assert all(len(c["fold_hF"]) == 3 and c["hF_std"] >= 0 for c in summary["candidates"].values())

    # published with pixel features, the version serves through the same Predictor: consistent, calibrated paths
    metrics = {**selection.cv.metrics, "model_choice": summary}
    manifest = publish(tmp_path / "models", TAX, CFG, build_backbone(CFG).state_dict(), heads,
                       selection.cv.temperature, metrics, "fp", features=pixel_features_spec())
    bundle = load_live(tmp_path / "models")
    assert bundle.manifest.features["kind"] == FeatureKind.PIXELS.value and bundle.heads.hidden == 0
    assert bundle.manifest.metrics["model_choice"]["chosen"] == "pixels+linear"
    assert bundle.features_version == PixelConfig().version
    predictor = Predictor(bundle, cache_dir=tmp_path / "cache", device="cpu")
    held, truth = dataset(quadrant_image, n=16, seed=7)
    items = []
    for im in held:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        items.append((buf.getvalue(), content_hash(buf.getvalue())))
    preds, errors = predictor.predict_encoded(items)
    assert not errors and all(p is not None and p.path in LEAVES and 0 < p.score <= 1 for p in preds)
    assert np.mean([p.path == t for p, t in zip(preds, truth)]) >= 0.75
    # pixel features cached under their own id: served from the cache, empty bytes never decoded
    again, again_errors = predictor.predict_encoded([(b"", h) for _, h in items])
    assert not again_errors and [p.path for p in again] == [p.path for p in preds]
    # image search uses the version's encoder (what the similarity index holds), not the pixel features
    vectors, ok = predictor.encoder_embedder.embed_with_mask(held[:2])  # (2, D)
    assert ok.all() and vectors.shape == (2, build_backbone(bundle.encoder_cfg).out_dim)
    assert manifest.version == bundle.manifest.version


def test_the_encoder_wins_where_pixels_see_nothing() -> None:
    images, paths = dataset(stripes_image)
    selection = select(features_of(images), list(CANDIDATES.values()), TAX.encode_many(paths), TAX, folds=3)
    scores = {n: s.hf_mean for n, s in selection.scores.items()}
    assert selection.chosen.features is FeatureSource.ENCODER, selection.reason
    assert scores[selection.chosen.name] > scores["pixels+linear"] + 0.3, scores


def test_a_tie_goes_to_the_simpler_candidate() -> None:
    rng = np.random.default_rng(0)
    paths = [LEAVES[i % 4] for i in range(24)]
    centres = rng.normal(size=(4, 16)) * 4
    same = (centres[[LEAVES.index(p) for p in paths]] + rng.normal(size=(24, 16)) * 0.3).astype(np.float32)
    features = {FeatureSource.PIXELS: same, FeatureSource.ENCODER: same.copy()}
    selection = select(features, parse_candidates(["encoder+mlp", "pixels+linear"]), TAX.encode_many(paths), TAX)
    assert {s.hf_mean for s in selection.scores.values()} == {1.0}
    assert selection.chosen.name == "pixels+linear" and "tied with encoder+mlp" in selection.reason
    assert TIE_MARGIN > 0


def test_folds_are_stratified_by_path_and_a_single_label_class_is_fine() -> None:
    paths = [LEAVES[0]] * 6 + [LEAVES[1]] * 6 + [LEAVES[2]] * 3 + [LEAVES[3]]  # one label of A/right... B/right
    targets = TAX.encode_many(paths)
    fold_of = path_folds(targets, 3)
    for leaf in LEAVES[:2]:
        rows = [i for i, p in enumerate(paths) if p == leaf]
        assert sorted(np.bincount(fold_of[rows], minlength=3).tolist()) == [2, 2, 2]
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(len(paths), 8)).astype(np.float32) + np.array([LEAVES.index(p) for p in paths])[:, None]
    selection = select({FeatureSource.ENCODER: emb, FeatureSource.PIXELS: emb}, list(CANDIDATES.values()), targets,
                       TAX, folds=3)
    assert set(selection.scores) == {"pixels+linear", "encoder+prototypes", "encoder+mlp"}
    assert len(selection.cv.oof_predictions) == len(paths) and 0.05 <= selection.cv.temperature <= 20


def test_duplicate_images_share_a_fold_and_do_not_inflate_the_score() -> None:
    """Thirty distinct images, each imported three times, with labels unrelated to the image: a model that memorises
    scores well when a copy of the held-out image sits in the training folds; grouped folds keep it honest."""
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(30, 16)).astype(np.float32)
    paths = [LEAVES[i % 4] for i in rng.permutation(30)]  # label independent of the image
    rows = np.repeat(np.arange(30), 3)  # (90,) each image three times
    emb = distinct[rows] + rng.normal(size=(90, 16)).astype(np.float32) * 0.01
    targets = TAX.encode_many([paths[r] for r in rows])
    fold_of = path_folds(targets, 3, groups=rows)
    assert all(len(set(fold_of[rows == g].tolist())) == 1 for g in range(30))
    assert sorted(np.bincount(fold_of, minlength=3).tolist()) == [30, 30, 30]
    mlp = parse_candidates(["encoder+mlp"])
    leaky = select({FeatureSource.ENCODER: emb}, mlp, targets, TAX, folds=3)
    honest = select({FeatureSource.ENCODER: emb}, mlp, targets, TAX, folds=3, groups=rows)
    assert leaky.scores["encoder+mlp"].path_accuracy > 0.8  # a copy of each held-out image was trained on
    assert honest.scores["encoder+mlp"].path_accuracy < 0.5  # chance is 0.25
    single = path_folds(targets[:3], 3, groups=np.zeros(3, dtype=np.int64))  # one group: rows dealt one by one
    assert sorted(single.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("fit_heads", [prototype_heads, logistic_heads])
def test_linear_heads_never_predict_a_class_without_labels(fit_heads) -> None:
    rng = np.random.default_rng(0)
    paths = [LEAVES[0]] * 5 + [LEAVES[1]] * 5 + [LEAVES[2]] * 5  # B/right has no label
    emb = (rng.normal(size=(15, 6)) + np.repeat(np.eye(6)[:3] * 5, 5, axis=0)).astype(np.float32)
    heads = fit_heads(emb, TAX.encode_many(paths), [TAX.num_classes(k) for k in range(TAX.depth)])
    assert heads.hidden == 0 and heads.heads[1][0].bias[TAX.encode(LEAVES[3])[1]] == UNSEEN_BIAS
    logits = heads_logits(heads, torch.from_numpy(rng.normal(size=(50, 6)).astype(np.float32) * 10))
    preds = decode(logits, TAX)
    assert all(p.path != LEAVES[3] for p in preds)
    train_preds = decode(heads_logits(heads, torch.from_numpy(emb)), TAX)
    assert np.mean([p.path == t for p, t in zip(train_preds, paths)]) == 1.0
