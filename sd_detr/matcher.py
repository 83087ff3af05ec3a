"""Hungarian matching of predictions to targets (scipy ``linear_sum_assignment``)."""

from __future__ import annotations

import numpy as np
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
        stacked_valid = None if valid is None else valid[None]
        return self.match_outputs(logits[None], boxes[None], targets, stacked_valid)[0]

    @torch.no_grad()
    def match_outputs(
        self, logits: Tensor, boxes: Tensor, targets: list[dict[str, Tensor]], valid: Tensor | None = None
    ) -> list[list[Assignment]]:
        """Match O outputs of one batch (every decoder layer, the TAQ encoder output) at once.

        logits [O, B, N, C], boxes [O, B, N, 4], ``valid`` [O, B, N] bool or None -> per output, one
        :data:`Assignment` per image, equal to calling :meth:`forward` on each output. All O cost matrices
        are built on the device and reach the CPU in a single transfer (one device-host synchronisation per
        training step instead of one per output); invalid predictions travel as +inf rows.
        """
        outputs, batch, num_queries = logits.shape[:3]
        sizes = [len(t["boxes"]) for t in targets]
        if len(targets) != batch:
            raise ValueError(f"{len(targets)} targets for a batch of {batch}")
        if valid is not None and valid.shape != (outputs, batch, num_queries):
            raise ValueError(f"valid {tuple(valid.shape)} must be {(outputs, batch, num_queries)}")
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [[(empty, empty) for _ in sizes] for _ in range(outputs)]
        with torch.autocast(device_type=logits.device.type, enabled=False):
            probabilities = logits.flatten(0, 2).float().sigmoid()
            predicted = boxes.flatten(0, 2).float()
            labels = torch.cat([t["labels"] for t in targets])
            target_boxes = torch.cat([t["boxes"] for t in targets]).float()
            cfg = self.config
            cost = (
                cfg.bbox_cost * torch.cdist(predicted, target_boxes, p=1)
                + cfg.class_cost * focal_class_cost(probabilities, labels, cfg.focal_alpha, cfg.focal_gamma)
                - cfg.giou_cost * pairwise_generalized_iou(predicted, target_boxes)
            )
            big = torch.finfo(cost.dtype).max
            cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
            if valid is not None:
                cost = cost.masked_fill(~valid.reshape(-1, 1), float("inf"))
        cost = cost.view(outputs, batch, num_queries, -1).cpu().numpy()  # the one device -> host transfer
        bounds = np.cumsum(sizes)[:-1]
        return [
            [
                _assign(chunk[index], valid is not None)
                for index, chunk in enumerate(np.split(cost[output], bounds, axis=-1))
            ]
            for output in range(outputs)
        ]


def _assign(image_cost: np.ndarray, masked: bool) -> Assignment:
    """Optimal assignment of one image: image_cost [N, T] on the host, invalid predictions as +inf rows when
    ``masked`` (solved among the finite rows, then mapped back to slot indices). Host-side NumPy throughout:
    nothing here touches the device."""
    if image_cost.shape[1] == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    slots = np.isfinite(image_cost[:, 0]).nonzero()[0] if masked else None
    if slots is not None:
        image_cost = image_cost[slots]
    rows, cols = linear_sum_assignment(image_cost)
    if slots is not None:
        rows = slots[rows]
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)
