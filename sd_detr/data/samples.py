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

MAX_IMAGE_PIXELS = 89_478_485
"""Decompression-bomb guard (pixels, W * H): Pillow's default warning threshold, about 9459 x 9459 px or
268 MB decoded as RGB. Larger images are corrupt for the converter, training and prediction alike."""
_WIDE_INTEGER_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_EXIF_ORIENTATION = 0x0112


class CorruptImageError(ValueError):
    """The bytes of an image do not decode."""


@dataclass(frozen=True)
class CorruptSample:
    """Stands in for a row whose image did not decode; the collate drops it and counts it."""

    image_id: int
    file_name: str
    error: str


def decode_image(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode encoded image bytes (JPEG, PNG, ... anything Pillow reads) to 8-bit RGB.

    The one decoder of the project: the converter verifies images with it and training, evaluation and
    prediction decode with it, so they agree on every file (docs/data.md, "Image formats"):
    - the stored pixel grid is used as is: no EXIF rotation (COCO's convention: boxes refer to the stored
      pixels, and `width`/`height` in the json are the stored size);
    - grayscale, palette, CMYK (Pillow's conversion, no ICC colour management) and other modes become RGB;
      an alpha channel is dropped (not composited);
    - 16-bit images become 8-bit: 16-bit RGB keeps the high byte (Pillow), 16/32-bit integer grayscale
      is scaled from 0..65535 to 0..255 (value / 257, rounded, clipped); float grayscale is clipped;
    - more than `MAX_IMAGE_PIXELS` pixels (decompression-bomb guard) is an error, checked from the header
      before any pixel is decoded; multi-frame files give their first frame.

    Returns:
        (pixels uint8 [H, W, 3], (H, W)).
    Raises:
        CorruptImageError: the bytes are empty, truncated, not an image, or too large.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise CorruptImageError(
                    f"decompression-bomb guard: {width}x{height} = {width * height / 1e6:.1f} Mpx exceeds the "
                    f"limit of {MAX_IMAGE_PIXELS / 1e6:.1f} Mpx"
                )
            image.load()
            pixels = _to_rgb8(image)
    except CorruptImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise CorruptImageError(f"decompression-bomb guard: {error}") from error
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise CorruptImageError(f"{type(error).__name__}: {error}") from error
    return pixels, (pixels.shape[0], pixels.shape[1])


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, 3] of a loaded Pillow image of any mode (see `decode_image` for the rules)."""
    if image.mode in _WIDE_INTEGER_MODES:
        wide = np.asarray(image).astype(np.float64)
        gray = np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "RGB":
        return np.array(image)
    return np.array(image.convert("RGB"))


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation tag (1..8) of encoded image bytes; 1 (upright) when absent or unreadable.

    Only used to explain a size mismatch: decoding never applies it.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(image.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # an explanation helper must never fail the caller
        return 1


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
