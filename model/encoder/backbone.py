"""The image encoder's network: a ResNet-family backbone without its classifier, its start weights and version.

``build_backbone(cfg)`` maps ``(N, 3, S, S)`` images to ``(N, D)`` embeddings (``D = backbone.out_dim``);
``model.encoder.embedder.Embedder`` runs it over many images. Also: which device and precision to run on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torchvision.models.resnet import BasicBlock

from model.encoder.config import _WIDTHS, Arch, EncoderConfig
from model.errors import ConfigError

__all__ = ["ResNetBackbone", "build_backbone", "embedding_dim", "encoder_version", "init_weights_arch",
           "load_backbone_weights"]


def embedding_dim(backbone: nn.Module) -> int:
    """The embedding width ``D`` of a backbone: its ``out_dim`` attribute (an int)."""
    dim = getattr(backbone, "out_dim", None)  # any module with out_dim, not only ResNetBackbone
    if not isinstance(dim, int):
        raise ConfigError(f"{type(backbone).__name__} has no integer out_dim; a backbone must say its embedding width.")
    return dim


class ResNetBackbone(nn.Module):
    """A torchvision-style ResNet with BasicBlocks and no classifier.

    State-dict keys equal torchvision's ``resnet18`` keys without ``fc.*``, so its weights load directly.

    Args:
        widths: Channels of the four stages; the stem has ``widths[0]`` channels.
        layers: Blocks per stage.
    """

    def __init__(self, widths: tuple[int, int, int, int], layers: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.out_dim = widths[-1]
        self._inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        # torchvision's BasicBlock only checks its width for the "base_width" argument, which we leave at 64.
        seq = [BasicBlock(self._inplanes, planes, stride, downsample)]
        self._inplanes = planes
        seq += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: images ``(N, 3, S, S)``. Returns: embeddings ``(N, D)``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # (N, D)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConfigError(f"init_weights file {str(path)!r} does not exist; give a local .safetensors/.pth file.")
    if path.suffix == ".safetensors":

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad pickle; all mean the same to the user
        raise ConfigError(f"init_weights file {str(path)!r} cannot be loaded safely ({exc}); "
                          "export a plain state_dict (.pth) or .safetensors.") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ConfigError(f"init_weights file {str(path)!r} holds a {type(obj).__name__}, not a state_dict.")
    return obj


_EXPECTED = ("a ResNet-18 state_dict as torchvision saves it (keys conv1.weight, bn1.*, layer1.* .. layer4.* with two "
             "BasicBlocks per stage, optional fc.*; e.g. torch.save(torchvision.models.resnet18(weights='IMAGENET1K_V1')"
             ".state_dict(), 'resnet18-imagenet.pt')), or a taxomoco encoder / MoCo checkpoint")


def _clean_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone part of a state dict: ``module.``/``backbone.`` prefixes removed, ``fc.*`` dropped; from a whole
    MoCo state dict (``backbone.*``, ``projection_head.*``, ``backbone_momentum.*`` ...) only ``backbone.*``."""
    if any(k.startswith("backbone.") for k in state):
        state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith("fc."):
            cleaned[key] = value
    return cleaned


def _describe_state(state: dict[str, torch.Tensor]) -> str:
    """What a state dict that is not a ResNet-18 looks like, in a few words."""
    if any(".conv3." in k for k in state):
        return "a ResNet with bottleneck blocks (ResNet-50/101/152)"
    if any(k.startswith("layer1.2.") for k in state):
        return "a ResNet with more than two blocks per stage (ResNet-34 or deeper)"
    if "conv1.weight" in state:
        return f"a network whose conv1.weight has shape {tuple(state['conv1.weight'].shape)}"
    keys = sorted(state)
    return f"{len(keys)} tensors with keys like {keys[:4]}"


def init_weights_arch(path: str | Path) -> Arch:
    """The architecture of a start-weights file, read from its key names and shapes.

    Accepts what :func:`load_backbone_weights` loads: a torchvision ResNet-18 state dict (full width → ``resnet18``),
    a half-width one (``resnet18-half``), with or without ``fc.*`` and ``module.``/``backbone.`` prefixes.

    Raises:
        ConfigError: the file is missing or unreadable, or holds something else; the message names the file,
            what it holds and what was expected.
    """
    state = _clean_keys(_read_weights(Path(path)))
    conv1 = state.get("conv1.weight")
    for arch, widths in _WIDTHS.items():
        if conv1 is None or tuple(conv1.shape) != (widths[0], 3, 7, 7):
            continue
        last = state.get("layer4.1.bn2.weight")
        if last is not None and tuple(last.shape) == (widths[3],) and not any(".conv3." in k for k in state) \
                and not any(k.startswith("layer1.2.") for k in state):
            return arch
    raise ConfigError(f"init_weights file {str(path)!r} holds {_describe_state(state)}; expected {_EXPECTED}.")


def load_backbone_weights(backbone: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads a backbone state dict strictly, after removing ``module.``/``backbone.`` prefixes and ``fc.*``.

    From a whole MoCo state dict (keys ``backbone.*``, ``projection_head.*``, ``backbone_momentum.*`` …)
    only the query backbone ``backbone.*`` is taken.

    Args:
        backbone: The module to load into.
        state: Parameter and buffer tensors by name.
        source: Names where the weights come from, for messages.

    Raises:
        ConfigError: Keys are missing or unexpected, or shapes differ (listing the first few).
    """
    cleaned = _clean_keys(state)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(own))
    wrong = sorted(k for k in set(own) & set(cleaned) if tuple(own[k].shape) != tuple(cleaned[k].shape))
    if missing or unexpected or wrong:
        raise ConfigError(
            f"weights from {source} do not fit the backbone: missing keys {missing[:5]} ({len(missing)}), "
            f"unexpected keys {unexpected[:5]} ({len(unexpected)}), shape mismatches {wrong[:5]} ({len(wrong)}); "
            "check that EncoderConfig.arch matches the file."
        )
    backbone.load_state_dict(cleaned, strict=True)


def build_backbone(cfg: EncoderConfig) -> ResNetBackbone:
    """Builds the backbone (randomly initialised, or from ``cfg.init_weights``); never downloads.

    Args:
        cfg: Architecture and optional initial weights.

    Returns:
        A module mapping ``(N, 3, S, S)`` to ``(N, D)`` with ``out_dim == D``.
    """
    backbone = ResNetBackbone(_WIDTHS[cfg.arch])
    if cfg.init_weights:
        load_backbone_weights(backbone, _read_weights(Path(cfg.init_weights)), repr(cfg.init_weights))
    return backbone


def encoder_version(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content address of a set of weights: equal weights give equal ids on every machine.

    Args:
        state_dict: Parameter and buffer tensors by name.

    Returns:
        16 hex characters of a sha256 over names, dtypes, shapes and bytes.
    """
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


