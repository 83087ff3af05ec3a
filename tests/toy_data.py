"""Tiny hand-drawn detection images for fast model tests (no files): coloured shapes on noise."""

from __future__ import annotations

import torch
from torch import Tensor

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
CLASS_COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2], [0.2, 0.3, 0.95]])


def draw_toy_image(height: int, width: int, boxes_xyxy: list[tuple[int, int, int, int]], labels: list[int], seed: int):
    """An image [3, H, W] in [0, 1]: grey noise with a filled rectangle of its class colour per box."""
    generator = torch.Generator().manual_seed(seed)
    image = 0.5 + 0.1 * torch.randn(3, height, width, generator=generator)
    for (x0, y0, x1, y1), label in zip(boxes_xyxy, labels, strict=True):
        image[:, y0:y1, x0:x1] = CLASS_COLOURS[label][:, None, None]
        if label == 1:  # a hollow shape: class is about the interior too
            image[:, y0 + 4 : y1 - 4, x0 + 4 : x1 - 4] = 0.5
    return image.clamp(0, 1)


def toy_batch(seed: int = 0) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Four images of different sizes padded into one batch: images [4, 3, H, W] normalized, padding_mask
    [4, H, W] (True = padded), targets with normalized cxcywh boxes, labels, image_id and orig_size."""
    layouts = [
        (96, 128, [(10, 12, 50, 60), (70, 30, 120, 80)], [0, 2]),
        (128, 96, [(20, 20, 80, 70)], [1]),
        (112, 112, [(5, 60, 45, 105), (50, 10, 100, 50), (60, 62, 105, 108)], [2, 0, 1]),
        (96, 96, [(30, 25, 75, 80)], [0]),
    ]
    height = max(h for h, *_ in layouts)
    width = max(w for _, w, *_ in layouts)
    images = torch.zeros(len(layouts), 3, height, width)
    padding_mask = torch.ones(len(layouts), height, width, dtype=torch.bool)
    targets = []
    for index, (h, w, boxes, labels) in enumerate(layouts):
        image = draw_toy_image(h, w, boxes, labels, seed + index)
        images[index, :, :h, :w] = (image - IMAGENET_MEAN) / IMAGENET_STD
        padding_mask[index, :h, :w] = False
        xyxy = torch.tensor(boxes, dtype=torch.float32)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        normalized = xyxy / scale
        cxcywh = torch.stack(
            [
                (normalized[:, 0] + normalized[:, 2]) / 2,
                (normalized[:, 1] + normalized[:, 3]) / 2,
                normalized[:, 2] - normalized[:, 0],
                normalized[:, 3] - normalized[:, 1],
            ],
            dim=-1,
        )
        targets.append({
            "boxes": cxcywh,
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": torch.tensor(index + 1),
            "orig_size": torch.tensor([h, w]),
        })  # fmt: skip
    return images, padding_mask, targets
