"""One shard row -> one training sample: decode the image bytes, build the target, transform.

Used by both loading paths (Ray Data in `pipelines/ray_data.py`, `torch.utils.data` in
`sd_detr.data.dataset`), so both see the same decoding, label map and corrupt-image handling.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors

from sd_detr.data.meta import DatasetMeta
from sd_detr.data.transforms import DetectionTransform

logger = logging.getLogger(__name__)

Target = dict[str, torch.Tensor]


class CorruptImageError(ValueError):
    """The bytes of an image do not decode."""


@dataclass(frozen=True)
class CorruptSample:
    """Stands in for a row whose image did not decode; the collate drops it and counts it."""

    image_id: int
    file_name: str
    error: str


def decode_image(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode encoded image bytes (JPEG, PNG, ... anything Pillow reads) to RGB.

    Returns:
        (pixels uint8 [H, W, 3], (H, W)). No EXIF rotation is applied: COCO boxes refer to the stored
        pixel grid.
    Raises:
        CorruptImageError: the bytes are empty, truncated or not an image.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            pixels = np.array(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"{type(error).__name__}: {error}") from error
    return pixels, (pixels.shape[0], pixels.shape[1])


def build_target(row: Mapping[str, Any], meta: DatasetMeta, height: int, width: int) -> Target:
    """The target of one shard row before any transform, crowd annotations excluded.

    Returns:
        {"boxes": BoundingBoxes float32 [n, 4] XYXY absolute px (canvas (H, W)),
         "labels": int64 [n] contiguous labels, "image_id": int64 [], "orig_size": int64 [2] (H, W)}.
    """
    boxes = np.asarray(row["boxes"], dtype=np.float32).reshape(-1, 4)
    category_ids = np.asarray(row["category_ids"], dtype=np.int64)
    iscrowd = np.asarray(row["iscrowd"], dtype=np.int8)
    if not (len(boxes) == len(category_ids) == len(iscrowd)):
        raise ValueError(
            f"image {row['image_id']}: {len(boxes)} boxes, {len(category_ids)} category ids and "
            f"{len(iscrowd)} iscrowd flags; the shard row is inconsistent"
        )
    keep = iscrowd == 0
    xywh = torch.from_numpy(boxes[keep].copy())
    xyxy = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    return {
        "boxes": tv_tensors.BoundingBoxes(xyxy, format="XYXY", canvas_size=(height, width)),
        "labels": torch.as_tensor(meta.category_id_to_label(category_ids[keep]), dtype=torch.int64),
        "image_id": torch.tensor(int(row["image_id"]), dtype=torch.int64),
        "orig_size": torch.tensor([height, width], dtype=torch.int64),
    }


def row_seed(base_seed: int, image_id: int, epoch: int) -> int:
    """A per-row augmentation seed that differs per epoch and per image, reproducible for a base seed."""
    sequence = np.random.SeedSequence([base_seed & 0xFFFFFFFF, image_id & 0xFFFFFFFFFFFF, epoch])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


def decode_row(
    row: Mapping[str, Any],
    meta: DatasetMeta,
    transform: DetectionTransform,
    *,
    seed: int | None = None,
    normalize: bool = True,
) -> tuple[torch.Tensor, Target] | CorruptSample:
    """Decode and transform one shard row.

    Args:
        row: mapping with the shard columns (`image` bytes, flat `boxes`, `category_ids`, `iscrowd`, ...).
        meta: dataset meta (category-id -> label map).
        transform: train or eval `DetectionTransform`.
        seed: seed of the transform's random choices for this row (None: torch's global RNG).
        normalize: True -> image float32 ImageNet-normalized; False -> uint8 (normalize later with
            `transform.normalize`, which keeps Ray Data's object store 4x smaller).
    Returns:
        (image [3, H, W], target) with target as in `DetectionTransform`, or a `CorruptSample` when the
        image bytes do not decode (logged as a warning with the image id and file name).
    """
    image_id = int(row["image_id"])
    try:
        pixels, (height, width) = decode_image(row["image"])
    except CorruptImageError as error:
        logger.warning("skipping corrupt image image_id=%s file_name=%s: %s", image_id, row.get("file_name"), error)
        return CorruptSample(image_id, str(row.get("file_name", "")), str(error))
    image = tv_tensors.Image(torch.from_numpy(pixels).permute(2, 0, 1))
    target = build_target(row, meta, height, width)
    if seed is None:
        image_out, target = transform.apply_geometry(image, target)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image_out, target = transform.apply_geometry(image, target)
    return (transform.normalize(image_out) if normalize else image_out), target
