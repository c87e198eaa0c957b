"""ModelStore: background loads, version reporting, hot reload, failed loads."""

import os
import threading
import time
from dataclasses import dataclass

import pytest

from ml_backend.paths import ProjectPaths
from ml_backend.serving.store import UNTRAINED, ModelStore
from ml_backend.settings import Settings


@dataclass
class Served:
    version: str


class Files:
    """A LIVE pointer file per project and a loader that takes its time, like a real bundle load."""

    def __init__(self, root, delay=0.3):
        self.root, self.delay = root, delay
        self.threads: list[str] = []
        self.fail: set[str] = set()

    def set_live(self, pid, version):
        """Switch LIVE atomically, as model.bundle.publish does (a plain write_text can be read half done)."""
        d = ProjectPaths(self.root, pid).models
        d.mkdir(parents=True, exist_ok=True)
        (d / ".LIVE.tmp").write_text(version)
        os.replace(d / ".LIVE.tmp", d / "LIVE")

    def probe(self, pid):
        p = ProjectPaths(self.root, pid).models / "LIVE"
        return p.read_text() if p.exists() else None

    def load(self, pid):
        self.threads.append(threading.current_thread().name)
        version = self.probe(pid)
        time.sleep(self.delay)
        if version in self.fail:
            raise OSError(f"bundle {version} is damaged")
        return Served(version)


@pytest.fixture
def files(tmp_path):
    return Files(tmp_path)


@pytest.fixture
def store(tmp_path, files):
    s = ModelStore(Settings(model_dir=tmp_path), loader=files.load, probe=files.probe, check_interval_s=0.1, retry_after_s=0.5)
    yield s
    s.close()


def wait_for(cond, timeout=5.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_untrained_before_any_model(store):
    assert store.version(3) == UNTRAINED
    assert store.get(3, wait_s=0.2) is None
    assert store.status(3)["served_version"] is None


def test_first_load_runs_in_background_and_get_can_wait(store, files):
    files.set_live(1, "v1")
    t0 = time.monotonic()
    assert store.version(1) == "v1"  # reported while it loads
    assert time.monotonic() - t0 < 0.1
    assert store.get(1) is None  # not waited for
    model = store.get(1, wait_s=5)
    assert model is not None and model.version == "v1"
    assert files.threads and all(name.startswith("model-load") for name in files.threads)
    assert threading.current_thread().name not in files.threads


def test_hot_reload_swaps_after_the_new_version_is_built(store, files):
    files.set_live(1, "v1")
    assert store.get(1, wait_s=5).version == "v1"
    files.delay = 0.6
    files.set_live(1, "v2")
    time.sleep(0.3)
    assert store.version(1) == "v1" and store.get(1).version == "v1"  # old one served while v2 loads
    assert wait_for(lambda: store.get(1).version == "v2")
    assert store.version(1) == "v2"
    assert store.status(1)["loads"] == 2


def test_watcher_reloads_without_requests(store, files):
    files.set_live(2, "a")
    store.get(2, wait_s=5)
    files.set_live(2, "b")
    assert wait_for(lambda: store.status(2)["served_version"] == "b")


def test_default_store_reports_a_new_version_within_a_fraction_of_a_second(tmp_path):
    """A version published right after a probe reaches /setup within ~0.2 s + its load, not a second later."""
    files = Files(tmp_path, delay=0.0)
    store = ModelStore(Settings(model_dir=tmp_path), loader=files.load, probe=files.probe)
    try:
        files.set_live(1, "v1")
        assert store.get(1, wait_s=5).version == "v1"
        assert store.version(1) == "v1"  # a probe just now
        files.set_live(1, "v2")
        t0 = time.monotonic()
        assert wait_for(lambda: store.version(1) == "v2", timeout=5.0)
        assert time.monotonic() - t0 < 0.8  # one probe a second took >= 1 s here
    finally:
        store.close()


def test_failed_load_keeps_the_old_model_and_is_retried(store, files):
    files.set_live(1, "v1")
    store.get(1, wait_s=5)
    files.fail.add("v2")
    files.set_live(1, "v2")
    assert wait_for(lambda: store.status(1)["load_error"] is not None)
    assert "damaged" in store.status(1)["load_error"]
    assert store.version(1) == "v1" and store.get(1).version == "v1"
    files.fail.clear()
    assert wait_for(lambda: store.version(1) == "v2")


def test_failed_first_load_reports_untrained(store, files):
    files.fail.add("v1")
    files.set_live(4, "v1")
    assert store.get(4, wait_s=5) is None
    assert store.version(4) == UNTRAINED


def test_projects_are_separate_and_versions_listed(store, files, tmp_path):
    files.set_live(1, "x1")
    files.set_live(2, "y1")
    assert store.get(1, wait_s=5).version == "x1" and store.get(2, wait_s=5).version == "y1"
    assert store.projects() == [1, 2]
    vdir = ProjectPaths(tmp_path, 1).models / "versions"
    for name in ("20260101T000000-a", "20260102T000000-b", ".tmp-partial"):
        (vdir / name).mkdir(parents=True)
        (vdir / name / "manifest.json").write_text("{}")
    (vdir / "20260103T000000-unfinished").mkdir()
    assert store.versions(1) == ["20260102T000000-b", "20260101T000000-a"] and store.versions(9) == []


def test_broken_probe_keeps_serving(tmp_path, files):
    calls = {"n": 0}

    def probe(pid):
        calls["n"] += 1
        if calls["n"] > 1:
            raise ValueError("LIVE is garbage")
        return "v1"

    s = ModelStore(Settings(model_dir=tmp_path), loader=lambda pid: Served("v1"), probe=probe, check_interval_s=0.05)
    try:
        assert s.get(1, wait_s=5).version == "v1"
        time.sleep(0.1)
        assert s.version(1) == "v1"
        assert "garbage" in s.status(1)["probe_error"]
    finally:
        s.close()


def publish_tiny_bundle(models_root, taxonomy, seed=0):
    """Publish a real (untrained) model version through model.bundle: ResNet-18-half at 32 px + heads."""
    import torch

    from model.bundle import publish
    from model.encoder.backbone import build_backbone
    from model.encoder.config import EncoderConfig
    from model.heads.heads import TaxonomyHeads

    torch.manual_seed(seed)
    cfg = EncoderConfig(arch="resnet18-half", input_size=32)
    backbone = build_backbone(cfg)
    heads = TaxonomyHeads(cfg.out_dim, [taxonomy.num_classes(k) for k in range(taxonomy.depth)], hidden=16)
    return publish(models_root, taxonomy, cfg, backbone.state_dict(), heads, 1.0, {}, f"tiny-{seed}")


def test_real_bundles_are_loaded_and_hot_reloaded(tmp_path):
    import torch
    from PIL import Image

    from model.taxonomy import Taxonomy

    torch.set_num_threads(1)
    taxonomy = Taxonomy.from_nested({"Animal": ["Cat", "Dog"], "Plant": None})
    settings = Settings(model_dir=tmp_path, device="cpu")
    store = ModelStore(settings, check_interval_s=0.05)
    try:
        assert store.version(5) == UNTRAINED and store.get(5, wait_s=1) is None
        first = publish_tiny_bundle(settings.project(5).models, taxonomy, seed=0)
        predictor = store.get(5, wait_s=60)
        assert predictor is not None and predictor.version == first.version == store.version(5)
        images = [Image.new("RGB", (20, 24), (200, 30, 30)), None]
        preds = predictor.predict(images, ["a" * 64, None], leafs_only=True)
        assert preds[1] is None and preds[0].path in {("Animal", "Cat"), ("Animal", "Dog"), ("Plant",)}
        assert 0.0 < preds[0].score <= 1.0
        assert any((ProjectPaths(tmp_path, 5).cache).iterdir())  # the embedding cache of the project
        # encoded images: one cache read, only misses decoded (the cached one's bytes are never looked at)
        again, errors = predictor.predict_encoded([(b"not an image", "a" * 64), (b"not an image", "b" * 64), None])
        assert again[0] == preds[0] and again[1] is None and again[2] is None and list(errors) == [1]
        time.sleep(1.1)  # versions are named by the second
        second = publish_tiny_bundle(settings.project(5).models, taxonomy, seed=1)
        assert second.version != first.version
        assert wait_for(lambda: store.version(5) == second.version, timeout=60)
        assert store.get(5).version == second.version
        assert store.versions(5) == [second.version, first.version]
    finally:
        store.close()
