"""Padding collates: `pad_and_collate` of normalized samples (the `torch.utils.data.DataLoader` path, prediction)
and `pad_and_normalize` of uint8 images (the Ray Data path, which ships uint8 and normalizes per batch)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sd_detr.data.samples import CorruptSample, Target


@dataclass
class DetectionBatch:
    """A padded batch of images and their per-image targets.

    Attributes:
        images: float32 [B, 3, H, W], ImageNet-normalized; zero beyond each image (bottom/right padding
            to the largest H and W of the batch).
        padding_mask: bool [B, H, W], True where padded.
        targets: B dicts, see `sd_detr.data.transforms` (boxes [n, 4] normalized cxcywh, labels int64 [n],
            image_id, orig_size (h, w), size (h, w)).
        num_corrupt: rows of this batch dropped because their image bytes did not decode. B can be smaller
            than the requested batch size, and 0 when every row was corrupt.
        corrupt_image_ids: the image ids of those rows.
        image_sizes: each image's valid (height, width) in pixels, known on the host (the collate's shapes), so
            the backbone need not read them from a device mask; None = read them from `padding_mask`.
    """

    images: torch.Tensor
    padding_mask: torch.Tensor
    targets: list[Target]
    num_corrupt: int = 0
    corrupt_image_ids: list[int] = field(default_factory=list)
    image_sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> DetectionBatch:
        """A copy with every tensor on `device`."""
        return DetectionBatch(
            images=self.images.to(device, non_blocking=non_blocking),
            padding_mask=self.padding_mask.to(device, non_blocking=non_blocking),
            targets=[{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets],
            num_corrupt=self.num_corrupt,
            corrupt_image_ids=list(self.corrupt_image_ids),
            image_sizes=self.image_sizes,
        )


def pad_and_collate(samples: Sequence[tuple[torch.Tensor, Target] | CorruptSample]) -> DetectionBatch:
    """Stack samples into a `DetectionBatch`, padding bottom/right to the largest H and W.

    Args:
        samples: (image float32 [3, H_i, W_i], target) pairs; `CorruptSample`s are dropped and counted.
    """
    corrupt = [s for s in samples if isinstance(s, CorruptSample)]
    valid = [s for s in samples if not isinstance(s, CorruptSample)]
    if valid:
        height = max(image.shape[-2] for image, _ in valid)
        width = max(image.shape[-1] for image, _ in valid)
        dtype = valid[0][0].dtype
    else:
        height = width = 0
        dtype = torch.float32
    images = torch.zeros(len(valid), 3, height, width, dtype=dtype)
    padding_mask = torch.ones(len(valid), height, width, dtype=torch.bool)
    for index, (image, _) in enumerate(valid):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image of shape [3, H, W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        images[index, :, :h, :w] = image
        padding_mask[index, :h, :w] = False
    return DetectionBatch(
        images=images,
        padding_mask=padding_mask,
        targets=[target for _, target in valid],
        num_corrupt=len(corrupt),
        corrupt_image_ids=[s.image_id for s in corrupt],
        image_sizes=[(int(image.shape[-2]), int(image.shape[-1])) for image, _ in valid],
    )


def pad_and_normalize(
    images: Sequence[np.ndarray], mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [3, H_i, W_i] -> (float32 [B, 3, H, W] normalized, bool padding mask [B, H, W]).

    Each image is normalized as `sd_detr.data.transforms.normalize_image` does ((x / 255 - mean) / std in
    float32, the same values bit for bit) straight into its slot of the zero-padded batch, bottom/right
    padding to the largest H and W, so the result equals `pad_and_collate` of normalized samples. NumPy,
    not torch: one pass per image, and no intra-op threads competing with a training step that runs at the
    same time (the Ray iterator collates in a background thread).
    """
    for image in images:
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image of shape [3, H, W], got {tuple(image.shape)}")
    height = max((image.shape[1] for image in images), default=0)
    width = max((image.shape[2] for image in images), default=0)
    batch = np.zeros((len(images), 3, height, width), dtype=np.float32)
    padding_mask = np.ones((len(images), height, width), dtype=bool)
    mean_column = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std_column = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    for index, image in enumerate(images):
        h, w = image.shape[1:]
        slot = batch[index, :, :h, :w]
        np.divide(image, np.float32(255.0), out=slot, dtype=np.float32)
        slot -= mean_column
        slot /= std_column
        padding_mask[index, :h, :w] = False
    return torch.from_numpy(batch), torch.from_numpy(padding_mask)
