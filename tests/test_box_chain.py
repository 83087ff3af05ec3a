"""A box survives COCO xywh pixels -> normalized cxcywh -> postprocess -> COCO results exactly."""

from __future__ import annotations

import torch

from sd_detr.box_ops import inverse_sigmoid
from sd_detr.evaluation import CocoEvaluator, coco_from_dict, detections_to_coco_results, targets_to_coco
from sd_detr.postprocess import postprocess


def test_box_round_trip_in_a_padded_batch() -> None:
    images = [
        (480, 640, [[10.0, 20.0, 100.0, 50.0], [300.5, 200.25, 40.0, 80.0]]),
        (333, 250, [[0.0, 0.0, 250.0, 333.0]]),
    ]
    category_ids = torch.tensor([3, 7])
    logits = torch.full((2, 4, 2), -10.0)
    boxes = torch.full((2, 4, 4), 0.5)
    targets = []
    for index, (height, width, xywh_list) in enumerate(images):
        xywh = torch.tensor(xywh_list, dtype=torch.float64)
        scale = torch.tensor([width, height, width, height], dtype=torch.float64)
        cxcywh = torch.cat([xywh[:, :2] + xywh[:, 2:] / 2, xywh[:, 2:]], dim=1) / scale
        targets.append({"boxes": cxcywh.float(), "labels": torch.arange(len(xywh)) % 2,
                        "image_id": torch.tensor(index + 1), "orig_size": torch.tensor([height, width])})  # fmt: skip
        # the network emits the target boxes through a sigmoid, as the box head does
        boxes[index, : len(xywh)] = inverse_sigmoid(cxcywh.float(), eps=1e-9).sigmoid()
        logits[index, torch.arange(len(xywh)), torch.arange(len(xywh)) % 2] = 10.0
    orig_sizes = torch.tensor([[h, w] for h, w, _ in images])
    detections = postprocess(logits, boxes, orig_sizes, top_k=3, label_to_category_id=category_ids)
    results = detections_to_coco_results([1, 2], detections)
    confident = [r for r in results if r["score"] > 0.99]
    expected = [(1, 3, images[0][2][0]), (1, 7, images[0][2][1]), (2, 3, images[1][2][0])]
    assert len(confident) == len(expected)
    for result, (image_id, category, xywh) in zip(confident, expected, strict=True):
        assert result["image_id"] == image_id and result["category_id"] == category
        assert torch.allclose(torch.tensor(result["bbox"]), torch.tensor(xywh), atol=1e-3)
    ground_truth = coco_from_dict(targets_to_coco(targets, category_ids))
    evaluator = CocoEvaluator(ground_truth)
    evaluator.update([1, 2], detections)
    assert evaluator.summarize()["AP"] > 0.999


def test_evaluator_without_detections_reports_zero() -> None:
    ground_truth = coco_from_dict({
        "images": [{"id": 1, "height": 10, "width": 10}],
        "annotations": [{"id": 1, "image_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0, "category_id": 1}],
        "categories": [{"id": 1, "name": "a"}],
    })  # fmt: skip
    evaluator = CocoEvaluator(ground_truth)
    empty = {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    evaluator.update([1], [empty])
    stats = evaluator.summarize()
    assert len(stats) == 12 and stats["AP"] == 0.0


def test_postprocess_returns_every_pair_when_fewer_than_top_k() -> None:
    """N * C = 6 < 100: all six (slot, class) pairs, best first, boxes inside the image."""
    logits = torch.tensor([[[0.0, 1.0, -1.0], [2.0, -2.0, 0.5]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.4, 0.4]]])
    (detections,) = postprocess(logits, boxes, torch.tensor([[32, 48]]))
    assert detections["scores"].shape == (6,) and detections["boxes"].shape == (6, 4)
    assert torch.allclose(detections["scores"], logits.flatten().sigmoid().sort(descending=True).values)
    assert (detections["boxes"][:, 2] <= 48).all() and (detections["boxes"][:, 3] <= 32).all()
