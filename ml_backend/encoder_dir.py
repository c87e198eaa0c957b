"""An encoder directory: what ``taxomoco pretrain`` writes and the folder commands read back.

It holds ``encoder.safetensors`` (the backbone's weights) and ``encoder.json`` (its config and version, the content
hash of the weights, checked on reading).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from model.encoder.backbone import encoder_version
from model.encoder.config import EncoderConfig
from model.errors import BundleError

__all__ = ["ENCODER_META", "ENCODER_WEIGHTS", "load_encoder", "save_encoder"]

ENCODER_WEIGHTS = "encoder.safetensors"
ENCODER_META = "encoder.json"


def save_encoder(out_dir: Path, cfg: EncoderConfig, state: dict) -> str:
    """Write an encoder directory; returns its version (content hash of the weights)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    version = encoder_version(state)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_dir / ENCODER_WEIGHTS))
    (out_dir / ENCODER_META).write_text(json.dumps({"config": cfg.to_dict(), "version": version}, indent=2))
    return version


def load_encoder(enc_dir: Path) -> tuple[EncoderConfig, dict, str]:
    """Read an encoder directory written by :func:`save_encoder` (safetensors only, version checked)."""
    meta_file, weights = enc_dir / ENCODER_META, enc_dir / ENCODER_WEIGHTS
    if not meta_file.exists() or not weights.exists():
        raise BundleError(
            f"{enc_dir} is not an encoder directory (needs {ENCODER_META} and {ENCODER_WEIGHTS}); "
            "create one with `taxomoco pretrain IMAGES_DIR --out DIR`."
        )
    meta = json.loads(meta_file.read_text())
    state = load_file(str(weights))
    if encoder_version(state) != meta["version"]:
        raise BundleError(f"{weights} does not match the version in {meta_file}: the directory is corrupt; pretrain again.")
    return EncoderConfig.from_dict(meta["config"]), state, meta["version"]
