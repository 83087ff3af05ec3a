"""Turn network outputs into detections in original-image pixels."""

from __future__ import annotations

import torch
from torch import Tensor

from sd_detr.box_ops import cxcywh_to_xyxy, size_scale


@torch.no_grad()
def postprocess(
    logits: Tensor,
    boxes: Tensor,
    orig_sizes: Tensor,
    top_k: int = 100,
    label_to_category_id: Tensor | None = None,
) -> list[dict[str, Tensor]]:
    """Top-k detections per image over all (slot, class) sigmoid scores.

    logits [B, N, C]; boxes [B, N, 4] normalized cxcywh; orig_sizes [B, 2] (height, width) in pixels of
    the original images. ``label_to_category_id`` [C] maps contiguous labels to dataset category ids.
    Returns per image ``scores`` [K], ``labels`` [K] (category ids when a map is given), ``boxes`` [K, 4]
    xyxy in original pixels, clipped to the image; K = min(top_k, N*C).
    """
    batch, num_queries, num_classes = logits.shape
    scores = logits.float().sigmoid().flatten(1)
    k = min(top_k, num_queries * num_classes)
    top_scores, top_index = scores.topk(k, dim=1)
    slots = torch.div(top_index, num_classes, rounding_mode="floor")
    labels = top_index % num_classes
    xyxy = cxcywh_to_xyxy(boxes.float()).gather(1, slots[..., None].expand(-1, -1, 4))
    scale = size_scale(orig_sizes[:, 0], orig_sizes[:, 1])[:, None, :]
    xyxy = (xyxy * scale).clamp(min=0)
    xyxy = torch.minimum(xyxy, scale)
    if label_to_category_id is not None:
        labels = label_to_category_id.to(labels.device)[labels]
    return [{"scores": top_scores[i], "labels": labels[i], "boxes": xyxy[i]} for i in range(batch)]
