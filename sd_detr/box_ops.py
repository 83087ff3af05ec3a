"""Box format helpers. Conventions: ``cxcywh`` = (center x, center y, width, height), ``xyxy`` = corners,
``xywh`` = COCO (top-left x, top-left y, width, height). Normalized boxes are fractions of the image size.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] cxcywh -> [..., 4] xyxy (same units)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] cxcywh (same units)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] xyxy -> [..., 4] COCO xywh (same units)."""
    return box_convert(boxes, "xyxy", "xywh")


def size_scale(height: Tensor | float, width: Tensor | float) -> Tensor:
    """Per-coordinate multiplier ``(width, height, width, height)`` that takes normalized boxes (cxcywh or xyxy)
    to pixels: float32 [4] for scalar sizes, [..., 4] for ``height``/``width`` tensors of shape [...]."""
    if isinstance(height, Tensor) or isinstance(width, Tensor):
        height, width = torch.as_tensor(height).float(), torch.as_tensor(width).float()
        return torch.stack([width, height, width, height], dim=-1)
    return torch.tensor([width, height, width, height], dtype=torch.float32)


def cxcywh_to_pixel_xyxy(boxes: Tensor, height: Tensor | float, width: Tensor | float) -> Tensor:
    """[..., 4] normalized cxcywh -> [..., 4] xyxy in pixels of an image ``height`` x ``width`` (scalars, or
    tensors broadcasting against ``boxes[..., 0]``). Computed in fp32; not clipped to the image."""
    return cxcywh_to_xyxy(boxes.float()) * size_scale(height, width).to(boxes.device)


def pairwise_generalized_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of every pair: boxes1 [N, 4] cxcywh, boxes2 [M, 4] cxcywh -> [N, M], computed in fp32."""
    return generalized_box_iou(cxcywh_to_xyxy(boxes1.float()), cxcywh_to_xyxy(boxes2.float()))


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to [eps, 1 - eps]; inverse of ``torch.sigmoid`` on (0, 1)."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def full_precision(device: torch.device) -> torch.autocast:
    """Context that turns autocast off on ``device``: what runs inside computes in the dtype of its inputs
    (fp32 when they are cast with ``.float()``). Reference points and boxes are computed inside it so that
    bf16/fp16 autocast never rounds box coordinates (docs/method.md 1.11)."""
    return torch.autocast(device_type=device.type, enabled=False)
