"""The Hungarian matcher returns the optimal assignment (brute force on small cases)."""

from __future__ import annotations

import itertools

import pytest
import torch

from sd_detr.box_ops import pairwise_generalized_iou
from sd_detr.config import MatcherConfig
from sd_detr.matcher import HungarianMatcher, focal_class_cost


def _cost(logits, boxes, target, config: MatcherConfig) -> torch.Tensor:
    return (
        config.bbox_cost * torch.cdist(boxes, target["boxes"], p=1)
        + config.class_cost
        * focal_class_cost(logits.sigmoid(), target["labels"], config.focal_alpha, config.focal_gamma)
        - config.giou_cost * pairwise_generalized_iou(boxes, target["boxes"])
    )


def _brute_force_minimum(cost: torch.Tensor) -> float:
    queries, count = cost.shape
    if count == 0:
        return 0.0
    return min(
        float(sum(cost[q, t] for t, q in enumerate(chosen))) for chosen in itertools.permutations(range(queries), count)
    )


@pytest.mark.parametrize("seed", range(6))
def test_assignment_is_optimal(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    config = MatcherConfig()
    logits = torch.randn(3, 5, 4, generator=generator)
    boxes = torch.cat(
        [torch.rand(3, 5, 2, generator=generator), torch.rand(3, 5, 2, generator=generator) * 0.4 + 0.05], -1
    )
    targets = []
    for count in (seed % 4, 0, 5):
        targets.append({
            "labels": torch.randint(0, 4, (count,), generator=generator),
            "boxes": torch.cat([torch.rand(count, 2, generator=generator), torch.rand(count, 2, generator=generator) * 0.4 + 0.05], -1),
        })  # fmt: skip
    assignments = HungarianMatcher(config)(logits, boxes, targets)
    for image, (rows, cols) in enumerate(assignments):
        count = len(targets[image]["labels"])
        assert len(rows) == len(cols) == count
        assert sorted(cols.tolist()) == list(range(count))
        assert len(set(rows.tolist())) == count
        cost = _cost(logits[image], boxes[image], targets[image], config)
        achieved = float(cost[rows, cols].sum()) if count else 0.0
        assert achieved == pytest.approx(_brute_force_minimum(cost), abs=1e-4)


def test_batch_without_any_target() -> None:
    logits, boxes = torch.randn(2, 4, 3), torch.rand(2, 4, 4)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for rows, cols in HungarianMatcher(MatcherConfig())(logits, boxes, [empty, empty]):
        assert rows.numel() == 0 and cols.numel() == 0 and rows.dtype == torch.int64
