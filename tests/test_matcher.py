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


@pytest.mark.parametrize("target_counts", [[3, 0, 5], [0, 0, 0], [1, 7, 2]])
def test_batched_matching_equals_per_output_matching(target_counts: list[int]) -> None:
    """All outputs matched in one call (one device-host transfer) give exactly the per-output assignments,
    with empty targets and with masked (invalid) predictions."""
    generator = torch.Generator().manual_seed(sum(target_counts) + len(target_counts))
    outputs, batch, queries, classes = 4, len(target_counts), 6, 5
    logits = torch.randn(outputs, batch, queries, classes, generator=generator)
    boxes = torch.rand(outputs, batch, queries, 4, generator=generator) * 0.5 + 0.25
    targets = [
        {
            "labels": torch.randint(0, classes, (count,), generator=generator),
            "boxes": torch.rand(count, 4, generator=generator) * 0.5 + 0.25,
        }
        for count in target_counts
    ]
    valid = torch.rand(outputs, batch, queries, generator=generator) > 0.3
    valid[0] = True  # one output without invalid slots
    matcher = HungarianMatcher(MatcherConfig())
    for mask in (None, valid):
        batched = matcher.match_outputs(logits, boxes, targets, mask)
        for output in range(outputs):
            single = matcher(logits[output], boxes[output], targets, None if mask is None else mask[output])
            for (rows_b, cols_b), (rows_s, cols_s) in zip(batched[output], single, strict=True):
                assert torch.equal(rows_b, rows_s) and torch.equal(cols_b, cols_s)
            if mask is not None:
                for image, (rows, _) in enumerate(single):
                    assert bool(mask[output, image, rows].all()), "an invalid slot was matched"
                    assert len(rows) == min(int(mask[output, image].sum()), target_counts[image])


def test_batched_matching_is_optimal_per_output() -> None:
    """Each output's assignment from the batched call reaches the brute-force minimum cost."""
    generator = torch.Generator().manual_seed(3)
    config = MatcherConfig()
    logits = torch.randn(3, 2, 4, 3, generator=generator)
    boxes = torch.rand(3, 2, 4, 4, generator=generator) * 0.5 + 0.25
    targets = [
        {"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=generator) * 0.5 + 0.25},
        {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=generator) * 0.5 + 0.25},
    ]
    for output, per_image in enumerate(HungarianMatcher(config).match_outputs(logits, boxes, targets)):
        for image, (rows, cols) in enumerate(per_image):
            cost = _cost(logits[output, image], boxes[output, image], targets[image], config)
            assert float(cost[rows, cols].sum()) == pytest.approx(_brute_force_minimum(cost), abs=1e-4)


def _brute_force_masked_minimum(cost: torch.Tensor, valid: torch.Tensor) -> float:
    """The cheapest matching of min(valid slots, targets) pairs that uses only valid slots (rows)."""
    rows = valid.nonzero().flatten().tolist()
    pairs = min(len(rows), cost.shape[1])
    if pairs == 0:
        return 0.0
    return min(
        float(sum(cost[q, t] for q, t in zip(chosen_rows, chosen_targets, strict=True)))
        for chosen_targets in itertools.combinations(range(cost.shape[1]), pairs)
        for chosen_rows in itertools.permutations(rows, pairs)
    )


@pytest.mark.parametrize("seed", range(4))
def test_masked_matching_is_optimal_over_the_valid_slots(seed: int) -> None:
    """With invalid slots (SD-DETR's masked predictions) each output's assignment uses valid slots only and reaches
    the brute-force minimum over them, also when there are fewer valid slots than targets."""
    generator = torch.Generator().manual_seed(seed)
    config = MatcherConfig()
    outputs, queries, classes, target_counts = 2, 6, 4, [2, 5, 0]
    logits = torch.randn(outputs, len(target_counts), queries, classes, generator=generator)
    boxes = torch.rand(outputs, len(target_counts), queries, 4, generator=generator) * 0.5 + 0.25
    targets = [
        {"labels": torch.randint(0, classes, (count,), generator=generator),
         "boxes": torch.rand(count, 4, generator=generator) * 0.5 + 0.25}
        for count in target_counts
    ]  # fmt: skip
    valid = torch.rand(outputs, len(target_counts), queries, generator=generator) > 0.4
    valid[1, 1] = torch.tensor([True, False, True, False, False, True])  # 3 valid slots for 5 targets
    matched = HungarianMatcher(config).match_outputs(logits, boxes, targets, valid)
    for output in range(outputs):
        for image, (rows, cols) in enumerate(matched[output]):
            assert bool(valid[output, image, rows].all())
            cost = _cost(logits[output, image], boxes[output, image], targets[image], config)
            achieved = float(cost[rows, cols].sum()) if len(rows) else 0.0
            assert len(rows) == min(int(valid[output, image].sum()), target_counts[image])
            assert achieved == pytest.approx(_brute_force_masked_minimum(cost, valid[output, image]), abs=1e-4)
