"""Backbone, weights loading, versions, transforms and the batched Embedder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from ml_backend.configs import encoder_config
from ml_backend.settings import Settings
from model.encoder.backbone import build_backbone, encoder_version, init_weights_arch
from model.encoder.config import Arch, EncoderConfig, eval_transform
from model.encoder.embedder import Embedder
from model.errors import ConfigError, ResourceError
from model.ssl.augment import moco_v2_transform
from model.ssl.config import AugmentConfig
from model.ssl.recipe import ImageSummary


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


def _images(n: int, size: int = 24, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("arch,dim,stem", [(Arch.RESNET18, 512, 64), (Arch.RESNET18_HALF, 256, 32)])
def test_backbone_shapes(arch: Arch, dim: int, stem: int) -> None:
    cfg = EncoderConfig(arch=arch, input_size=32)
    net = build_backbone(cfg).eval()
    assert net.out_dim == dim == cfg.out_dim
    assert net.conv1.out_channels == stem
    assert net(torch.randn(3, 3, 32, 32)).shape == (3, dim)


def test_resnet18_loads_torchvision_weights_and_matches_its_features(tmp_path: Path) -> None:
    tv = torchvision.models.resnet18(weights=None).eval()
    pth = tmp_path / "r18.pth"
    torch.save(tv.state_dict(), pth)  # includes fc.*, which is dropped
    st = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(st))
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    for path in (pth, st):
        ours = build_backbone(EncoderConfig(arch="resnet18", init_weights=str(path))).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours(x), tv(x))


def test_weights_for_another_arch_are_refused_with_the_keys(tmp_path: Path) -> None:
    half = build_backbone(EncoderConfig())
    path = tmp_path / "half.pth"
    torch.save(half.state_dict(), path)
    with pytest.raises(ConfigError, match="shape mismatches .*conv1.weight.*arch matches"):
        build_backbone(EncoderConfig(arch="resnet18", init_weights=str(path)))
    state = dict(half.state_dict())
    del state["layer4.1.bn2.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"missing keys \['layer4.1.bn2.bias'\].*unexpected keys \['extra.weight'\]"):
        build_backbone(EncoderConfig(init_weights=str(path)))
    with pytest.raises(ConfigError, match="does not exist"):
        build_backbone(EncoderConfig(init_weights=str(tmp_path / "none.pth")))


def test_encoder_config_roundtrip_and_validation() -> None:
    cfg = EncoderConfig(arch="resnet18", input_size=96, init_weights="w.safetensors")
    assert cfg.arch is Arch.RESNET18
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown encoder arch 'vit'"):
        EncoderConfig(arch="vit")
    with pytest.raises(ConfigError, match="input_size"):
        EncoderConfig(input_size=4)
    with pytest.raises(ConfigError, match="unknown EncoderConfig keys"):
        EncoderConfig.from_dict({"archh": "resnet18"})


def test_encoder_version_is_content_addressed() -> None:
    a = build_backbone(EncoderConfig())
    b = build_backbone(EncoderConfig())
    b.load_state_dict(a.state_dict())
    va = encoder_version(a.state_dict())
    assert va == encoder_version(b.state_dict()) and len(va) == 16
    with torch.no_grad():
        b.layer3[0].conv1.weight[0, 0, 0, 0] += 1e-3
    assert encoder_version(b.state_dict()) != va


def test_embedder_equals_bare_forward_and_reports_skipped() -> None:
    cfg = EncoderConfig(input_size=32)
    net = build_backbone(cfg)
    images = _images(7)
    sources: list = images[:3] + [b"broken"] + images[3:]
    emb = Embedder(net, cfg, device="cpu", batch_size=3, bf16=False)
    out, ok = emb.embed_with_mask(sources)
    assert out.shape == (8, 256) and out.dtype == np.float32
    assert ok.tolist() == [True] * 3 + [False] + [True] * 4
    assert np.isnan(out[3]).all()
    assert [i for i, _ in emb.stats.skipped] == [3]
    t = eval_transform(cfg)
    x = torch.stack([t(Image.fromarray(a)) for a in images])  # (7, 3, 32, 32)
    with torch.no_grad():
        ref = net.eval()(x).numpy()
    np.testing.assert_allclose(out[ok], ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(emb.embed_tensors(x), ref, rtol=1e-4, atol=1e-4)
    assert np.isnan(emb.embed(sources)[3]).all()


def test_embed_into_memmap_streams(tmp_path: Path) -> None:
    cfg = EncoderConfig(input_size=32)
    emb = Embedder(build_backbone(cfg), cfg, device="cpu", batch_size=4, bf16=False)
    images = _images(10)
    mm = np.lib.format.open_memmap(tmp_path / "e.npy", mode="w+", dtype=np.float32, shape=(10, 256))
    ok = emb.embed_into(images, mm)
    mm.flush()
    assert ok.all()
    again = np.load(tmp_path / "e.npy")
    np.testing.assert_allclose(again, emb.embed(images), rtol=1e-5, atol=1e-5)
    batches = list(emb.iter_batches(images))
    assert [len(i) for i, _ in batches] == [4, 4, 2]
    with pytest.raises(ConfigError, match="expected \\(10, 256\\)"):
        emb.embed_into(images, np.zeros((9, 256), np.float32))


def test_bf16_autocast_is_close() -> None:
    cfg = EncoderConfig(input_size=32)
    net = build_backbone(cfg)
    images = _images(4)
    ref = Embedder(net, cfg, device="cpu", bf16=False).embed(images)
    low = Embedder(net, cfg, device="cpu", bf16=True).embed(images)
    cos = (ref * low).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(low, axis=1)
    assert low.dtype == np.float32 and cos.min() > 0.98


class _SmallMemory(nn.Module):
    """A backbone that runs out of memory above a batch size, like a GPU would."""

    def __init__(self, inner: nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.out_dim = inner, limit, inner.out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {len(x)} images")
        return self.inner(x)


def test_out_of_memory_halves_the_batch_then_gives_up() -> None:
    cfg = EncoderConfig(input_size=32)
    net = build_backbone(cfg)
    images = _images(9)
    ref = Embedder(net, cfg, device="cpu", batch_size=8, bf16=False).embed(images)
    emb = Embedder(_SmallMemory(net, limit=3), cfg, device="cpu", batch_size=8, bf16=False)
    np.testing.assert_allclose(emb.embed(images), ref, rtol=1e-4, atol=1e-4)
    assert emb.stats.batch_size == 2
    tiny = Embedder(_SmallMemory(net, limit=0), cfg, device="cpu", batch_size=8, bf16=False)
    with pytest.raises(ResourceError, match="does not fit"):
        tiny.embed(images)


def test_transforms_shapes_and_grayscale() -> None:
    cfg = EncoderConfig(input_size=32)
    gray = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40), mode="L")
    x = eval_transform(cfg)(gray)
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456)  # same grey in every channel
    torch.manual_seed(0)
    views = moco_v2_transform(cfg, AugmentConfig())(gray.convert("RGB"))
    assert len(views) == 2 and all(v.shape == (3, 32, 32) for v in views)
    assert not torch.equal(views[0], views[1])
    with pytest.raises(ConfigError, match="outside"):
        AugmentConfig(blur_prob=1.5)
    assert AugmentConfig.from_dict(AugmentConfig().to_dict()) == AugmentConfig()


def test_a_torchvision_resnet18_checkpoint_decides_the_architecture(tmp_path: Path) -> None:
    """ENCODER_INIT_WEIGHTS = torch.save(torchvision.models.resnet18(...).state_dict()): loaded whatever ENCODER_ARCH
    says (the default is the half-width net), giving torchvision's own features."""
    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18-imagenet.pt"
    torch.save(tv.state_dict(), path)
    settings = Settings.from_env(env={"ENCODER_INIT_WEIGHTS": str(path)}, model_dir=tmp_path)
    assert settings.arch == "resnet18-half"
    cfg = encoder_config(settings, ImageSummary(sampled=8, median_side=200, gray_share=0.0))
    assert cfg.arch is Arch.RESNET18 and cfg.init_weights == str(path) and cfg.out_dim == 512
    ours = build_backbone(cfg).eval()
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x))
    half = tmp_path / "half.safetensors"
    save_file({k: v.contiguous() for k, v in build_backbone(EncoderConfig()).state_dict().items()}, str(half))
    assert init_weights_arch(half) is Arch.RESNET18_HALF


def test_a_checkpoint_that_is_not_a_resnet18_is_refused_naming_the_file_and_what_was_expected(tmp_path: Path) -> None:
    r50 = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), r50)
    with pytest.raises(ConfigError, match=r"resnet50.pth' holds a ResNet with bottleneck blocks .*expected a ResNet-18 "
                                          r"state_dict as torchvision saves it \(keys conv1.weight"):
        encoder_config(Settings.from_env(env={"ENCODER_INIT_WEIGHTS": str(r50)}, model_dir=tmp_path), ImageSummary(0, 0, 0.0))
    r34 = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), r34)
    with pytest.raises(ConfigError, match="more than two blocks per stage"):
        init_weights_arch(r34)
    other = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(2, 2)}, other)
    with pytest.raises(ConfigError, match=r"other.pth' holds 1 tensors with keys like \['encoder.weight'\]"):
        init_weights_arch(other)
    with pytest.raises(ConfigError, match="does not exist"):
        init_weights_arch(tmp_path / "missing.pt")
