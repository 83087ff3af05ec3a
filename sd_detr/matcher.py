"""Hungarian matching of predictions to targets (scipy ``linear_sum_assignment``)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from sd_detr.box_ops import pairwise_generalized_iou
from sd_detr.config import MatcherConfig

Assignment = tuple[Tensor, Tensor]
"""Per image: (prediction indices [K] int64, target indices [K] int64), K = min(N, number of targets)."""


def focal_class_cost(probabilities: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal classification cost: probabilities [P, C] (sigmoid), labels [T] -> cost [P, T]."""
    negative = (1 - alpha) * probabilities**gamma * -(1 - probabilities + 1e-8).log()
    positive = alpha * (1 - probabilities) ** gamma * -(probabilities + 1e-8).log()
    return positive[:, labels] - negative[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``class_cost*focal + bbox_cost*L1 + giou_cost*(-GIoU)``.

    One cost matrix is built for the whole batch ([B*N, T_total], fp32) and split per image before the
    assignment; images without targets get empty assignments.
    """

    def __init__(self, config: MatcherConfig) -> None:
        super().__init__()
        self.config = config

    @torch.no_grad()
    def forward(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], valid: Tensor | None = None
    ) -> list[Assignment]:
        """logits [B, N, C], boxes [B, N, 4] normalized cxcywh; targets: per image ``labels`` [T_i] int64
        and ``boxes`` [T_i, 4] normalized cxcywh; ``valid`` [B, N] bool (None = all): only valid predictions
        are assigned (K = min(valid predictions, T_i)) -> one :data:`Assignment` per image."""
        batch, num_queries = logits.shape[:2]
        sizes = [len(t["boxes"]) for t in targets]
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch}")
        if valid is not None and valid.shape != (batch, num_queries):
            raise ValueError(f"valid {tuple(valid.shape)} must be {(batch, num_queries)}")
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty) for _ in sizes]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probabilities = logits.flatten(0, 1).float().sigmoid()
            predicted = boxes.flatten(0, 1).float()
            labels = torch.cat([t["labels"] for t in targets])
            target_boxes = torch.cat([t["boxes"] for t in targets]).float()
            cfg = self.config
            cost = (
                cfg.bbox_cost * torch.cdist(predicted, target_boxes, p=1)
                + cfg.class_cost * focal_class_cost(probabilities, labels, cfg.focal_alpha, cfg.focal_gamma)
                - cfg.giou_cost * pairwise_generalized_iou(predicted, target_boxes)
            )
        big = torch.finfo(cost.dtype).max
        cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big).view(batch, num_queries, -1).cpu()
        valid_rows = None if valid is None else [row.nonzero()[:, 0] for row in valid.cpu()]
        assignments = []
        for index, chunk in enumerate(cost.split(sizes, dim=-1)):
            image_cost = chunk[index]
            if valid_rows is not None:  # solve among the valid predictions, then map back to slot indices
                image_cost = image_cost[valid_rows[index]]
            rows, cols = linear_sum_assignment(image_cost.numpy())
            rows = torch.as_tensor(rows, dtype=torch.int64)
            if valid_rows is not None:
                rows = valid_rows[index][rows]
            assignments.append((rows, torch.as_tensor(cols, dtype=torch.int64)))
        return assignments
