"""Batched embedding of many images with an encoder backbone.

:class:`Embedder` runs a backbone (``model.encoder.backbone.build_backbone``) over many images (paths, bytes, PIL images
or arrays) in eval mode with channels-last memory and bf16 autocast where the hardware supports it, and
streams results batch by batch so that a large collection is never held in memory at once. A forward pass
that runs out of memory is split in halves and retried.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from model.arrays import BoolArray, FloatArray, IntArray
from model.data import ImageListDataset, collate_skipping
from model.encoder.backbone import embedding_dim
from model.encoder.config import EncoderConfig, eval_transform
from model.encoder.device import bf16_supported, resolve_device
from model.errors import ConfigError, ResourceError
from model.images import ImageSource

__all__ = ["EmbedStats", "Embedder"]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


@dataclass
class EmbedStats:
    """What happened in the last embedding run.

    Attributes:
        skipped: ``(index, reason)`` for each image that could not be read.
        batch_size: The forward batch size finally used (smaller than requested after out-of-memory).
    """

    skipped: list[tuple[int, str]] = field(default_factory=list)
    batch_size: int = 0


class Embedder:
    """Embeds images with a backbone: eval mode, inference mode, channels-last, optional bf16, batched.

    The backbone is moved to ``device`` and put in eval mode (the caller's module is changed).
    When a forward pass runs out of memory, the batch is split in halves and retried, and the smaller
    size is kept for the rest of the run; only a single image that does not fit raises ResourceError.

    Args:
        backbone: Maps ``(N, 3, S, S)`` to ``(N, D)``; must have ``out_dim``.
        cfg: The encoder config (input size, normalisation).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` …
        batch_size: Images per forward pass.
        num_workers: Data loader worker processes for decoding (0 = decode in this process).
        bf16: Use bf16 autocast; ``None`` = where the hardware supports it (CUDA, AVX512-BF16/AMX CPUs).
        channels_last: Use channels-last memory format (faster convolutions on CPU and GPU).
    """

    def __init__(
        self,
        backbone: nn.Module,
        cfg: EncoderConfig,
        device: str = "auto",
        batch_size: int = 256,
        num_workers: int = 0,
        bf16: bool | None = None,
        channels_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1.")

        self.cfg = cfg
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.bf16 = bf16_supported(self.device) if bf16 is None else bf16
        self.channels_last = channels_last
        self.out_dim = embedding_dim(backbone)
        self.transform = eval_transform(cfg)
        self.backbone = backbone.to(self.device).eval()
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.stats = EmbedStats(batch_size=batch_size)
        self._chunk = batch_size

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass of preprocessed images ``(B, 3, S, S)`` → ``(B, D)`` float32 on CPU."""
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        outs = []
        start = 0
        while start < len(x):
            part = x[start:start + self._chunk]
            try:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    outs.append(self.backbone(part).float().cpu())  # (b, D)
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                if not _is_oom(exc):
                    raise
                if self._chunk == 1:
                    raise ResourceError(
                        f"a single {tuple(part.shape[1:])} image does not fit in {self.device} memory; "
                        "lower EncoderConfig.input_size or use a device with more memory."
                    ) from exc
                self._chunk = max(1, self._chunk // 2)
                self.stats.batch_size = self._chunk
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            start += len(part)
        return torch.cat(outs)

    @torch.inference_mode()
    def embed_tensors(self, x: torch.Tensor) -> FloatArray:
        """Embeds already preprocessed images.

        Args:
            x: Normalised images ``(N, 3, S, S)`` float32.

        Returns:
            Embeddings ``(N, D)`` float32.
        """
        out = [self._forward(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.cat(out).numpy() if out else np.zeros((0, self.out_dim), np.float32)

    def _dataset(self, images: Sequence[ImageSource] | Dataset[Any]) -> tuple[Dataset[Any], int]:
        """The dataset to load and its length."""
        if isinstance(images, Dataset):
            if not isinstance(images, Sized):
                raise ConfigError(f"{type(images).__name__} has no length; give the embedder a map-style dataset with __len__.")
            return images, len(images)
        return ImageListDataset(images, self.transform), len(images)

    def iter_batches(
        self, images: Sequence[ImageSource] | Dataset[Any], progress: bool = False
    ) -> Iterator[tuple[IntArray, FloatArray]]:
        """Embeds images batch by batch.

        A ``Dataset`` must yield what :class:`~model.images.ImageListDataset` yields (``(tensor, index)``
        or ``Skipped``). Unreadable images are left out and recorded in ``self.stats.skipped``.

        Args:
            images: Image sources or such a dataset.
            progress: Show a progress bar.

        Yields:
            ``(indices (B,) int64, embeddings (B, D) float32)`` in input order.
        """
        dataset, n = self._dataset(images)
        self.stats = EmbedStats(batch_size=self._chunk)
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=collate_skipping,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        with tqdm(total=n, desc="embed", unit="img", disable=not progress) as bar:
            for x, indices, skipped in loader:
                self.stats.skipped.extend(skipped)
                if x is not None:
                    with torch.inference_mode():
                        emb = self._forward(x)  # (B, D)
                    yield indices.numpy(), emb.numpy()
                    del x, emb  # free this batch before the loader builds the next one
                bar.update(len(indices) + len(skipped))

    def embed_into(
        self, images: Sequence[ImageSource] | Dataset[Any], out: FloatArray, progress: bool = False
    ) -> BoolArray:
        """Embeds images straight into a caller-given array (e.g. an ``np.memmap``), batch by batch.

        Args:
            images: N image sources or a dataset of length N.
            out: Writable ``(N, D)`` float32 array; rows of unreadable images are left untouched.
            progress: Show a progress bar.

        Returns:
            ``ok`` ``(N,)`` bool: True where a row was written.
        """
        _, n = self._dataset(images)
        if out.shape != (n, self.out_dim):
            raise ConfigError(f"output array has shape {out.shape}; expected ({n}, {self.out_dim}).")
        ok = np.zeros(n, dtype=bool)
        for idx, emb in self.iter_batches(images, progress=progress):
            out[idx] = emb
            ok[idx] = True
        return ok

    def embed_with_mask(
        self, images: Sequence[ImageSource] | Dataset[Any], progress: bool = False
    ) -> tuple[FloatArray, BoolArray]:
        """Embeds images in memory and says which could be read.

        Returns:
            ``(embeddings (N, D) float32, ok (N,) bool)``; rows where ``ok`` is False are NaN.
        """
        _, n = self._dataset(images)
        out = np.full((n, self.out_dim), np.nan, dtype=np.float32)  # (N, D)
        ok = self.embed_into(images, out, progress=progress)
        return out, ok

    def embed(self, images: Sequence[ImageSource] | Dataset[Any], progress: bool = False) -> FloatArray:
        """Embeds images in memory.

        Args:
            images: N image sources (paths, bytes, PIL images, uint8 arrays) or a dataset.
            progress: Show a progress bar.

        Returns:
            Embeddings ``(N, D)`` float32. Rows of unreadable images are NaN; they are listed in
            ``self.stats.skipped`` (use :meth:`embed_with_mask` for a boolean mask).
        """
        return self.embed_with_mask(images, progress=progress)[0]

