"""Taxonomy heads: learning from embeddings, IGNORE handling, imbalance options, the frozen encoder."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from model.encoder.backbone import build_backbone
from model.encoder.config import Arch, EncoderConfig
from model.encoder.frozen import changed_state, frozen, snapshot_state
from model.errors import ConfigError, DataError
from model.heads.decode import decode
from model.heads.heads import HeadsConfig, Normalization, TaxonomyHeads
from model.heads.mlp_training import train_heads
from model.taxonomy import IGNORE, Taxonomy

TAX = Taxonomy.from_nested({"wild": ["bear", "zebra"], "pet": ["cat", "dog", "fish"], "bird": None})
FAST = HeadsConfig(hidden=32, epochs=5, min_steps=100, batch_size=64)


def clustered(n: int, taxonomy: Taxonomy, dim: int = 16, noise: float = 0.6, seed: int = 0, weights=None):
    """Embeddings around one random centre per leaf; returns (emb (N, D), targets (N, L), leaf index (N,))."""
    rng = np.random.default_rng(seed)
    leaves = [leaf.path for leaf in taxonomy.leaves()]
    centres = rng.normal(size=(len(leaves), dim)) * 2
    which = rng.choice(len(leaves), size=n, p=weights)
    emb = (centres[which] + rng.normal(size=(n, dim)) * noise + 5.0).astype(np.float32)  # offset: tests scaling
    return emb, taxonomy.encode_many([leaves[i] for i in which]), which


def test_heads_learn_a_ragged_taxonomy() -> None:
    torch.set_num_threads(1)
    emb, y, which = clustered(600, TAX, seed=0)
    heads = train_heads(emb[:400], y[:400], TAX, FAST)
    assert [h[-1].out_features for h in heads.heads] == [TAX.num_classes(k) for k in range(TAX.depth)]
    with torch.no_grad():
        logits = heads(torch.from_numpy(emb[400:]))
    assert [tuple(t.shape) for t in logits] == [(200, 3), (200, 6)]
    preds = decode(logits, TAX)
    leaves = [leaf.path for leaf in TAX.leaves()]
    acc = np.mean([p.path == leaves[i] for p, i in zip(preds, which[400:])])
    assert acc > 0.95
    assert not heads.training and not any(p.requires_grad is False for p in heads.parameters())


def test_prefix_targets_are_ignored_and_empty_rows_dropped() -> None:
    emb, y, _ = clustered(300, TAX, seed=1)
    y = y.copy()
    y[::3, 1] = IGNORE  # annotators gave only the top level for a third of the images
    y[1::10] = IGNORE  # unlabelled rows are dropped, not trained on
    heads = train_heads(emb, y, [3, 6], FAST)
    with torch.no_grad():
        top = heads(torch.from_numpy(emb))[0].argmax(1).numpy()
    known = y[:, 0] != IGNORE
    assert (top[known] == y[known, 0]).mean() > 0.95
    with pytest.raises(DataError, match="No labelled"):
        train_heads(emb[:5], np.full((5, 2), IGNORE), [3, 6], FAST)


def test_single_class_level_and_normalisation_buffers() -> None:
    tax = Taxonomy.from_nested({"root": ["a", "b"]})  # level 0 has one class
    emb, y, _ = clustered(200, tax, seed=2)
    heads = train_heads(emb, y, tax, FAST)
    with torch.no_grad():
        l0, l1 = heads(torch.from_numpy(emb))
    assert l0.shape == (200, 1) and torch.allclose(l0.softmax(1), torch.ones(200, 1))
    assert (l1.argmax(1).numpy() == y[:, 1]).mean() > 0.95
    # Standardisation statistics live in the state dict, so a saved head is self-contained.
    state = heads.state_dict()
    assert "mean" in state and "std" in state and float(state["std"].min()) > 0
    copy = TaxonomyHeads(16, [1, 2], hidden=32)
    copy.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(copy.eval()(torch.from_numpy(emb))[1], l1)


def test_training_is_deterministic_per_seed() -> None:
    emb, y, _ = clustered(200, TAX, seed=3)
    a = train_heads(emb, y, TAX, FAST).state_dict()
    b = train_heads(emb, y, TAX, FAST).state_dict()
    c = train_heads(emb, y, TAX, HeadsConfig(**{**FAST.to_dict(), "seed": 1})).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def minority_recall(cfg: HeadsConfig) -> float:
    tax = Taxonomy.from_nested({"common": None, "rare": None})
    emb, y, _ = clustered(1200, tax, dim=8, noise=2.5, seed=4, weights=[0.95, 0.05])
    heads = train_heads(emb[:800], y[:800], tax, cfg)
    with torch.no_grad():
        pred = heads(torch.from_numpy(emb[800:]))[0].argmax(1).numpy()
    rare = y[800:, 0] == 1
    return float((pred[rare] == 1).mean())


def test_oversampling_and_class_weights_raise_minority_recall() -> None:
    torch.set_num_threads(1)
    plain = minority_recall(FAST)
    assert minority_recall(HeadsConfig(**{**FAST.to_dict(), "oversample": True})) > plain + 0.1
    assert minority_recall(HeadsConfig(**{**FAST.to_dict(), "class_weighted": True})) > plain + 0.1


def test_validation_messages() -> None:
    emb, y, _ = clustered(20, TAX)
    with pytest.raises(DataError, match="same N"):
        train_heads(emb[:10], y, TAX, FAST)
    with pytest.raises(DataError, match="levels"):
        train_heads(emb, y[:, :1], TAX, FAST)
    bad = y.copy()
    bad[0, 1] = 6
    with pytest.raises(DataError, match=r"Level 1 targets"):
        train_heads(emb, bad, TAX, FAST)
    nan = emb.copy()
    nan[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        train_heads(nan, y, TAX, FAST)
    with pytest.raises(ConfigError, match="dropout"):
        HeadsConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="Unknown heads settings"):
        HeadsConfig.from_dict({"hiden": 3})
    cfg = HeadsConfig(normalization="l2", oversample=True)
    assert cfg.normalization is Normalization.L2 and HeadsConfig.from_dict(cfg.to_dict()) == cfg


def test_heads_train_fast_on_thousands_of_embeddings() -> None:
    torch.set_num_threads(1)
    emb = np.random.default_rng(5).normal(size=(4000, 256)).astype(np.float32)
    y = np.stack([np.arange(4000) % 3, np.arange(4000) % 6], 1)
    start = time.perf_counter()
    train_heads(emb, y, TAX, HeadsConfig(epochs=5))
    assert time.perf_counter() - start < 30  # ~2 s alone on one core; generous for a shared machine


def test_head_training_leaves_the_frozen_encoder_untouched() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = build_backbone(EncoderConfig(arch=Arch.RESNET18_HALF, input_size=32))
    images = torch.rand(24, 3, 32, 32)
    before = snapshot_state(backbone)
    with frozen(backbone):
        with torch.no_grad():
            emb = backbone(images)  # (24, D)
        y = np.stack([np.arange(24) % 3, np.r_[[0, 1, 2, 3, 4, 5] * 4]], 1)
        train_heads(emb, y, TAX, FAST)
    assert changed_state(backbone, before) == []
    assert backbone.training  # the previous mode is restored
    assert all(p.requires_grad for p in backbone.parameters())
    # The check can fail: a forward pass in train mode moves BatchNorm running statistics.
    with pytest.raises(RuntimeError, match="running_mean"):
        with frozen(backbone):
            backbone.train()
            backbone(images)
