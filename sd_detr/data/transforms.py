"""DETR's train augmentation and the eval transform, on `torchvision.transforms.v2`.

Input: a `tv_tensors.Image` uint8 [3, H, W] and the raw target of `sd_detr.data.samples.build_target`
(boxes `tv_tensors.BoundingBoxes` XYXY absolute px). Output target, per image:
    boxes      float32 [n, 4]  cxcywh normalized by the transformed image size (H', W')
    labels     int64 [n]       contiguous labels 0..C-1
    image_id   int64 []        COCO image id
    orig_size  int64 [2]       (H, W) of the decoded original image (to rescale predictions)
    size       int64 [2]       (H', W') after the transform
Empty images give boxes [0, 4] and labels [0]. Random choices use torch's global RNG (seed it per row
with `torch.random.fork_rng` + `torch.manual_seed`, as `decode_row` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sd_detr.box_ops import size_scale
from sd_detr.data.config import AugmentationConfig

Target = dict[str, torch.Tensor]


def normalize_image(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [..., 3, H, W] -> float32 [..., 3, H, W]: scaled to [0, 1], then (x - mean) / std per channel."""
    scaled = image.to(torch.float32).div_(255.0)
    return F.normalize(scaled, mean=list(mean), std=list(std))


class RandomSizeCrop(v2.Transform):
    """DETR's `RandomSizeCrop`: crop a random `h x w` window, each side drawn uniformly from
    [min_size, min(image side, max_size)] (clamped to the image), at a uniformly random position.

    Boxes are clipped to the window by `F.crop`; `v2.SanitizeBoundingBoxes` afterwards removes the ones
    left degenerate.
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        crop_h = self._draw(height)
        crop_w = self._draw(width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def _draw(self, side: int) -> int:
        high = min(side, self.max_size)
        low = min(self.min_size, high)
        return int(torch.randint(low, high + 1, ()))

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


class DetectionTransform:
    """Geometric transform + box conversion + normalization of one (image, target) pair.

    `apply_geometry` returns the uint8 image (so a Ray Data stage can ship compact pixels) and the final
    target; `normalize` turns uint8 [3, H, W] into float32 ImageNet-normalized; `__call__` does both.
    """

    def __init__(self, geometry: v2.Transform, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.geometry = geometry
        self.mean = tuple(mean)
        self.std = tuple(std)

    def apply_geometry(self, image: tv_tensors.Image, target: Target) -> tuple[torch.Tensor, Target]:
        """Apply the geometric part. Returns (uint8 [3, H', W'], target in the output format)."""
        image, boxes_and_labels = self.geometry(image, {"boxes": target["boxes"], "labels": target["labels"]})
        height, width = image.shape[-2:]
        boxes = F.convert_bounding_box_format(boxes_and_labels["boxes"], new_format="CXCYWH")
        return image.as_subclass(torch.Tensor), {
            "boxes": (boxes.as_subclass(torch.Tensor).float() / size_scale(height, width)).reshape(-1, 4),
            "labels": boxes_and_labels["labels"].to(torch.int64).reshape(-1),
            "image_id": target["image_id"],
            "orig_size": target["orig_size"],
            "size": torch.tensor([height, width], dtype=torch.int64),
        }

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 [3, H, W] -> float32 [3, H, W] normalized with this transform's mean/std."""
        return normalize_image(image, self.mean, self.std)

    def __call__(self, image: tv_tensors.Image, target: Target) -> tuple[torch.Tensor, Target]:
        """(uint8 image, raw target) -> (float32 normalized [3, H', W'], target)."""
        image, target = self.apply_geometry(image, target)
        return self.normalize(image), target


def build_train_transform(cfg: AugmentationConfig) -> DetectionTransform:
    """DETR's train augmentation: flip, then multi-scale resize or resize -> random crop -> resize."""
    resize = v2.RandomShortestSize(min_size=cfg.train_scales, max_size=cfg.train_max_size)
    if cfg.crop and cfg.crop_prob > 0:
        crop_branch = v2.Compose(
            [
                v2.RandomShortestSize(min_size=cfg.crop_pre_scales),
                RandomSizeCrop(cfg.crop_min_size, cfg.crop_max_size),
                v2.RandomShortestSize(min_size=cfg.train_scales, max_size=cfg.train_max_size),
            ]
        )
        scale_step: v2.Transform = v2.RandomChoice([resize, crop_branch], p=[1 - cfg.crop_prob, cfg.crop_prob])
    else:
        scale_step = resize
    geometry = v2.Compose(
        [
            v2.RandomHorizontalFlip(p=cfg.flip_prob),
            scale_step,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=cfg.min_box_size, min_area=cfg.min_box_size**2),
        ]
    )
    return DetectionTransform(geometry, cfg.mean, cfg.std)


def build_eval_transform(cfg: AugmentationConfig) -> DetectionTransform:
    """Eval transform: shorter side -> `eval_size`, longer side <= `eval_max_size`; boxes are kept."""
    return DetectionTransform(v2.Resize(cfg.eval_size, max_size=cfg.eval_max_size), cfg.mean, cfg.std)


def build_transform(cfg: AugmentationConfig, *, train: bool) -> DetectionTransform:
    """`build_train_transform` or `build_eval_transform`."""
    return build_train_transform(cfg) if train else build_eval_transform(cfg)
