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
