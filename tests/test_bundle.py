"""Model bundles: round trip, atomic publish under simulated crashes, refusal of every mismatch, pruning."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import model.bundle.writer as bundle_mod
from model.bundle import (
    ENCODERS,
    HEADS,
    LIVE,
    MANIFEST,
    VERSIONS,
    list_versions,
    live_version,
    load_bundle,
    load_live,
    prune,
    publish,
)
from model.encoder.backbone import build_backbone, encoder_version
from model.encoder.config import Arch, EncoderConfig
from model.errors import BundleError
from model.heads.heads import HeadsConfig, TaxonomyHeads
from model.heads.mlp_training import train_heads
from model.taxonomy import Taxonomy

TAX = Taxonomy.from_nested({"wild": ["bear", "zebra"], "pet": ["cat", "dog"], "bird": None})
CFG = EncoderConfig(arch=Arch.RESNET18_HALF, input_size=32)


@pytest.fixture(scope="module")
def backbone_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_backbone(CFG).state_dict()


def small_heads(seed: int = 0, taxonomy: Taxonomy = TAX, dim: int = 256) -> TaxonomyHeads:
    rng = np.random.default_rng(seed)
    leaves = [leaf.path for leaf in taxonomy.leaves()]
    emb = rng.normal(size=(20, dim)).astype(np.float32)
    targets = taxonomy.encode_many([leaves[i % len(leaves)] for i in range(20)])
    return train_heads(emb, targets, taxonomy, HeadsConfig(hidden=8, epochs=1, min_steps=3, seed=seed))


def do_publish(root: Path, state, heads: TaxonomyHeads | None = None, t: float = 1.5):
    return publish(root, TAX, CFG, state, heads or small_heads(), t, {"path_accuracy": 0.9, "n_labelled": 20},
                   "fp123", extra={"policy": "majority", "arr": np.float32(2.5)})


def test_round_trip(tmp_path: Path, backbone_state) -> None:
    heads = small_heads()
    m = do_publish(tmp_path, backbone_state, heads)
    assert live_version(tmp_path) == m.version and list_versions(tmp_path) == [m.version]
    b = load_live(tmp_path)
    assert b.manifest == m and b.taxonomy == TAX and b.encoder_cfg == CFG and b.temperature == 1.5
    assert m.encoder_version == encoder_version(backbone_state) and m.embedding_dim == 256
    assert m.num_classes == [3, 5] and m.counts == {"labelled": 20} and m.extra["arr"] == 2.5
    assert m.heads["training"]["hidden"] == 8 and set(m.libraries) == {"torch", "torchvision", "lightly", "taxomoco"}
    assert all(torch.equal(b.backbone_state[k], v) for k, v in backbone_state.items())
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert all(torch.equal(a, c) for a, c in zip(heads(x), b.heads(x)))
    assert not b.heads.training
    # A heads-only retrain re-uses the encoder file; versions sort by creation.
    m2 = do_publish(tmp_path, backbone_state, small_heads(1))
    assert m2.version > m.version and list_versions(tmp_path) == [m.version, m2.version]
    assert live_version(tmp_path) == m2.version
    assert len(list((tmp_path / ENCODERS).glob("*.safetensors"))) == 1
    assert load_bundle(tmp_path, m.version).manifest.version == m.version
    # Only safetensors + JSON on disk.
    files = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json", ""}


def test_crash_while_publishing_keeps_the_live_version(tmp_path: Path, backbone_state, monkeypatch) -> None:
    first = do_publish(tmp_path, backbone_state)

    def boom(*args, **kwargs):
        raise OSError("disk died")

    with monkeypatch.context() as mp:  # crash before the version directory is renamed into place
        mp.setattr(os, "rename", boom)
        with pytest.raises(OSError, match="disk died"):
            do_publish(tmp_path, backbone_state, small_heads(1))
    assert live_version(tmp_path) == first.version and list_versions(tmp_path) == [first.version]
    assert not [p for p in (tmp_path / VERSIONS).iterdir() if p.name.startswith(".")]  # temporary removed

    with monkeypatch.context() as mp:  # crash while the heads file is written
        mp.setattr(bundle_mod, "save_file", boom)
        with pytest.raises(OSError):
            do_publish(tmp_path, backbone_state, small_heads(2))
    assert load_live(tmp_path).manifest.version == first.version

    with monkeypatch.context() as mp:  # crash when switching the pointer: the new version exists, LIVE is old
        mp.setattr(os, "replace", boom)
        with pytest.raises(OSError):
            do_publish(tmp_path, backbone_state, small_heads(3))
    assert live_version(tmp_path) == first.version and len(list_versions(tmp_path)) == 2
    assert load_live(tmp_path).manifest.version == first.version
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    new = do_publish(tmp_path, backbone_state, small_heads(4))  # the next publish succeeds
    assert load_live(tmp_path).manifest.version == new.version


def edit_manifest(vdir: Path, **changes) -> None:
    data = json.loads((vdir / MANIFEST).read_text())
    data.update(changes)
    (vdir / MANIFEST).write_text(json.dumps(data))


def test_every_mismatch_is_refused(tmp_path: Path, backbone_state) -> None:
    with pytest.raises(BundleError, match="No model has been published"):
        load_live(tmp_path)
    m = do_publish(tmp_path, backbone_state)
    vdir = tmp_path / VERSIONS / m.version
    pristine = {p.name: p.read_bytes() for p in vdir.iterdir()}
    enc_file = tmp_path / ENCODERS / f"{m.encoder_version}.safetensors"
    enc_bytes = enc_file.read_bytes()

    def restore() -> None:
        for name, data in pristine.items():
            (vdir / name).write_bytes(data)
        enc_file.write_bytes(enc_bytes)
        load_live(tmp_path)  # valid again

    (vdir / HEADS).unlink()
    with pytest.raises(BundleError, match="heads file .* missing"):
        load_live(tmp_path)
    restore()

    other = Taxonomy.from_nested({"a": None, "b": None})
    save_file(small_heads(taxonomy=other).state_dict(), str(vdir / HEADS))
    with pytest.raises(BundleError, match="heads weights do not match the manifest"):
        load_live(tmp_path)
    restore()

    edit_manifest(vdir, taxonomy=Taxonomy.from_nested({"wild": ["bear", "lion"], "pet": ["cat", "dog"],
                                                       "bird": None}).to_json())
    with pytest.raises(BundleError, match="taxonomy hashes to"):
        load_live(tmp_path)
    restore()

    edit_manifest(vdir, encoder={**CFG.to_dict(), "arch": "resnet18"})
    with pytest.raises(BundleError, match="encoder features are 512-d but the heads take 256-d"):
        load_live(tmp_path)
    restore()

    torch.manual_seed(1)
    save_file(build_backbone(CFG).state_dict(), str(enc_file))
    with pytest.raises(BundleError, match="encoder weights hash to"):
        load_live(tmp_path)
    restore()

    enc_file.unlink()
    with pytest.raises(BundleError, match="encoder file .* missing"):
        load_live(tmp_path)
    restore()

    (vdir / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not a valid manifest"):
        load_live(tmp_path)
    restore()

    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path, "20200101T000000-000000")
    with pytest.raises(BundleError, match="taxonomy needs"):
        publish(tmp_path, TAX, CFG, backbone_state, small_heads(taxonomy=other), 1.0, {}, "fp")
    with pytest.raises(BundleError, match=r"features \(encoder\) give 256-d"):
        publish(tmp_path, TAX, CFG, backbone_state, small_heads(dim=64), 1.0, {}, "fp")
    assert list_versions(tmp_path) == [m.version]


def test_prune_keeps_newest_and_live(tmp_path: Path, backbone_state) -> None:
    versions = [do_publish(tmp_path, backbone_state, small_heads(i)).version for i in range(4)]
    (tmp_path / LIVE).write_text(versions[0])  # rolled back to the oldest
    torch.manual_seed(7)
    other_state = build_backbone(CFG).state_dict()
    newest = do_publish(tmp_path, other_state).version  # a second encoder
    (tmp_path / LIVE).write_text(versions[0])
    old_enc = tmp_path / ENCODERS / f"{encoder_version(other_state)}.safetensors"
    os.utime(old_enc, (1, 1))  # long written
    removed = prune(tmp_path, keep=2)
    assert removed == versions[1:3]
    assert list_versions(tmp_path) == [versions[0], versions[3], newest]
    assert old_enc.exists()  # still used by the newest version
    prune(tmp_path, keep=1)
    assert list_versions(tmp_path) == [versions[0], newest]
    (tmp_path / LIVE).write_text(newest)
    prune(tmp_path, keep=1)
    assert list_versions(tmp_path) == [newest]
    first_enc = tmp_path / ENCODERS / f"{encoder_version(backbone_state)}.safetensors"
    assert first_enc.exists()  # unused now, but young: a publish might be about to use it
    os.utime(first_enc, (1, 1))
    prune(tmp_path, keep=1)
    assert [p.stem for p in (tmp_path / ENCODERS).glob("*.safetensors")] == [encoder_version(other_state)]
    assert load_live(tmp_path).manifest.version == newest


def test_concurrent_reader_always_sees_a_complete_version(tmp_path: Path, backbone_state) -> None:
    first = do_publish(tmp_path, backbone_state).version
    seen: list[str] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                b = load_live(tmp_path)
                with torch.no_grad():
                    b.heads(torch.zeros(1, 256))
                seen.append(b.manifest.version)
            except BaseException as exc:  # recorded, asserted below
                errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        published = [do_publish(tmp_path, backbone_state, small_heads(i)).version for i in range(4)]
        prune(tmp_path, keep=2)
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert seen and seen == sorted(seen)  # versions only move forward
    assert set(seen) <= {first, *published}
    assert load_live(tmp_path).manifest.version == published[-1]


def test_fit_publish_load_predict_agree(tmp_path: Path, backbone_state) -> None:
    from model.heads.training import fit, predict

    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    leaves = [leaf.path for leaf in TAX.leaves()]
    centres = rng.normal(size=(len(leaves), 256)) * 2
    which = np.arange(60) % len(leaves)
    emb = (centres[which] + rng.normal(size=(60, 256))).astype(np.float32)
    result = fit(emb, [leaves[i] for i in which], TAX, HeadsConfig(hidden=16, epochs=3, min_steps=40), folds=3)
    m = publish(tmp_path, TAX, CFG, backbone_state, result.heads, result.temperature, result.metrics, "fp")
    b = load_live(tmp_path)
    assert b.manifest.metrics["folds"] == 3 and b.temperature == pytest.approx(result.temperature)
    assert m.heads["training"]["min_steps"] == 40
    before = predict(result.heads, result.temperature, emb, TAX, leafs_only=False, prefix_threshold=0.6)
    after = predict(b.heads, b.temperature, emb, TAX, leafs_only=False, prefix_threshold=0.6)
    assert [(p.path, p.score) for p in before] == [(p.path, p.score) for p in after]
