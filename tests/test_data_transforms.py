"""DETR train/eval transforms on torchvision v2, per-row seeding, and the padding collate."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torchvision import tv_tensors
from torchvision.transforms import v2

from sd_detr.data.collate import DetectionBatch, pad_and_collate
from sd_detr.data.config import IMAGENET_MEAN, IMAGENET_STD, AugmentationConfig
from sd_detr.data.samples import CorruptSample
from sd_detr.data.transforms import (
    DetectionTransform,
    RandomSizeCrop,
    build_eval_transform,
    build_train_transform,
)


def _raw_target(boxes_xyxy: list[list[float]], labels: list[int], height: int, width: int) -> dict:
    return {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes_xyxy, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.tensor(labels, dtype=torch.int64),
        "image_id": torch.tensor(42),
        "orig_size": torch.tensor([height, width]),
    }


def _coordinate_image(height: int, width: int) -> tv_tensors.Image:
    """uint8 image whose channel 0 holds the column index and channel 1 the row index (sides < 256)."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return tv_tensors.Image(torch.stack([xs, ys, torch.zeros_like(xs)]).to(torch.uint8))


def _to_xyxy(cxcywh: torch.Tensor, height: int, width: int) -> torch.Tensor:
    cx, cy, w, h = cxcywh.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * torch.tensor([width, height] * 2)


def test_eval_transform_resizes_shorter_side_and_keeps_boxes() -> None:
    transform = build_eval_transform(AugmentationConfig(eval_size=80, eval_max_size=200))
    boxes = [[10.0, 20.0, 60.0, 90.0], [0.0, 0.0, 150.0, 100.0]]
    image, target = transform(_coordinate_image(100, 150), _raw_target(boxes, [3, 1], 100, 150))
    assert image.dtype == torch.float32 and image.shape == (3, 80, 120)
    assert target["size"].tolist() == [80, 120] and target["orig_size"].tolist() == [100, 150]
    torch.testing.assert_close(_to_xyxy(target["boxes"], 100, 150), torch.tensor(boxes), atol=1e-4, rtol=0)
    assert target["labels"].tolist() == [3, 1] and int(target["image_id"]) == 42


def test_eval_transform_caps_the_longer_side() -> None:
    transform = build_eval_transform(AugmentationConfig(eval_size=80, eval_max_size=160))
    image, target = transform(_coordinate_image(50, 250), _raw_target([[0, 0, 250, 50]], [0], 50, 250))
    assert image.shape[-1] == 160 and target["size"].tolist() == [32, 160]
    torch.testing.assert_close(target["boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))


def test_normalization_is_imagenet() -> None:
    transform = build_eval_transform(AugmentationConfig(eval_size=8, eval_max_size=16))
    white = tv_tensors.Image(torch.full((3, 8, 8), 255, dtype=torch.uint8))
    image, _ = transform(white, _raw_target([], [], 8, 8))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(image[:, 0, 0], expected)


def test_flip_mirrors_image_and_boxes() -> None:
    cfg = AugmentationConfig(flip_prob=1.0, crop=False, train_scales=[60], train_max_size=1000)
    transform = build_train_transform(cfg)
    source = _coordinate_image(60, 90)
    boxes = [[10.0, 5.0, 30.0, 25.0], [80.0, 40.0, 90.0, 60.0]]
    image, target = transform.apply_geometry(source, _raw_target(boxes, [0, 1], 60, 90))
    assert torch.equal(image, source.flip(-1))
    expected = torch.tensor([[60.0, 5.0, 80.0, 25.0], [0.0, 40.0, 10.0, 60.0]])
    torch.testing.assert_close(_to_xyxy(target["boxes"], 60, 90), expected, atol=1e-4, rtol=0)


def test_random_crop_clips_and_drops_boxes() -> None:
    transform = DetectionTransform(
        v2.Compose([RandomSizeCrop(30, 70), v2.SanitizeBoundingBoxes(min_size=1)]), IMAGENET_MEAN, IMAGENET_STD
    )
    boxes = torch.tensor([[5.0, 5.0, 40.0, 30.0], [50.0, 60.0, 95.0, 99.0], [20.0, 70.0, 22.0, 72.0]])
    crops = set()
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = transform.apply_geometry(
            _coordinate_image(100, 100), _raw_target(boxes.tolist(), [0, 1, 2], 100, 100)
        )
        height, width = image.shape[-2:]
        left, top = int(image[0, 0, 0]), int(image[1, 0, 0])
        assert 30 <= height <= 70 and 30 <= width <= 70
        crops.add((left, top, height, width))
        shifted = boxes - torch.tensor([left, top, left, top])
        clipped = torch.stack(
            [
                shifted[:, 0].clamp(0, width),
                shifted[:, 1].clamp(0, height),
                shifted[:, 2].clamp(0, width),
                shifted[:, 3].clamp(0, height),
            ],
            dim=1,
        )
        keep = ((clipped[:, 2] - clipped[:, 0]) >= 1) & ((clipped[:, 3] - clipped[:, 1]) >= 1)
        assert target["labels"].tolist() == torch.arange(3)[keep].tolist()
        torch.testing.assert_close(_to_xyxy(target["boxes"], height, width), clipped[keep], atol=1e-4, rtol=0)
        assert target["size"].tolist() == [height, width]
    assert len(crops) > 20  # the window really is random


def test_train_transform_varies_and_respects_sizes() -> None:
    cfg = AugmentationConfig()
    transform = build_train_transform(cfg)
    boxes = [[10.0, 10.0, 60.0, 50.0], [100.0, 80.0, 150.0, 140.0]]
    sizes, flips = set(), set()
    for seed in range(40):
        torch.manual_seed(seed)
        image, target = transform(_coordinate_image(150, 170), _raw_target(boxes, [0, 4], 150, 170))
        height, width = target["size"].tolist()
        assert image.shape == (3, height, width) and image.dtype == torch.float32
        # resized to one of the train scales (torchvision truncates, so 1 px below), or its long side capped
        scaled = any(scale - 1 <= min(height, width) <= scale for scale in cfg.train_scales)
        assert scaled or cfg.train_max_size - 1 <= max(height, width) <= cfg.train_max_size, (height, width)
        assert max(height, width) <= cfg.train_max_size
        b = target["boxes"]
        assert ((b >= 0) & (b <= 1)).all() and (b[:, 2:] > 0).all()
        assert set(target["labels"].tolist()) <= {0, 4}
        sizes.add((height, width))
        flips.add(bool(target["labels"].numel() and b[0, 0] > 0.5 and target["labels"][0] == 0))
    assert len(sizes) >= 5 and flips == {True, False}


@pytest.mark.parametrize("train", [True, False])
def test_empty_image_gives_empty_targets(train: bool) -> None:
    cfg = AugmentationConfig()
    transform = build_train_transform(cfg) if train else build_eval_transform(cfg)
    _, target = transform(_coordinate_image(130, 140), _raw_target([], [], 130, 140))
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64


def test_pad_and_collate_pads_bottom_right_and_counts_corrupt() -> None:
    first, second = torch.rand(3, 4, 5), torch.rand(3, 6, 2)
    target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    batch = pad_and_collate([(first, target), CorruptSample(9, "bad.png", "truncated"), (second, target)])
    assert isinstance(batch, DetectionBatch) and len(batch) == 2
    assert batch.images.shape == (2, 3, 6, 5) and batch.padding_mask.shape == (2, 6, 5)
    assert torch.equal(batch.images[0, :, :4, :5], first) and torch.equal(batch.images[1, :, :6, :2], second)
    assert batch.images[0, :, 4:].abs().sum() == 0 and batch.images[1, :, :, 2:].abs().sum() == 0
    expected_mask = torch.ones(2, 6, 5, dtype=torch.bool)
    expected_mask[0, :4, :5] = False
    expected_mask[1, :6, :2] = False
    assert torch.equal(batch.padding_mask, expected_mask)
    assert batch.num_corrupt == 1 and batch.corrupt_image_ids == [9]
    moved = batch.to("cpu")
    assert torch.equal(moved.images, batch.images) and moved.num_corrupt == 1

    empty = pad_and_collate([CorruptSample(1, "a", "x"), CorruptSample(2, "b", "y")])
    assert len(empty) == 0 and empty.images.shape == (0, 3, 0, 0) and empty.num_corrupt == 2


@pytest.mark.parametrize("min_box_size", [0.0, 0.5, 0.999])
def test_min_box_size_below_torchvisions_minimum_is_rejected(min_box_size: float) -> None:
    with pytest.raises(ValidationError, match="min_box_size"):
        AugmentationConfig(min_box_size=min_box_size)


def test_smallest_accepted_min_box_size_builds_the_train_transform() -> None:
    cfg = AugmentationConfig(min_box_size=1.0)
    image = tv_tensors.Image(torch.zeros(3, 64, 64, dtype=torch.uint8))
    _, target = build_train_transform(cfg)(image, _raw_target([[0, 0, 40, 40]], [1], 64, 64))
    assert target["labels"].tolist() == [1]
