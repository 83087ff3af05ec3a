"""The two collates: `pad_and_collate` (DataLoader path) and the Ray path's `DetectionCollateFn`
(`pad_and_normalize` of uint8 rows) give the same batches, and both record each image's size on the host."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.torch_batches import DetectionCollateFn
from sd_detr.backbone import valid_image_sizes
from sd_detr.data.collate import pad_and_collate, pad_and_normalize
from sd_detr.data.config import AugmentationConfig
from sd_detr.data.transforms import normalize_image


def _uint8_images(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (3, *rng.integers(4, 40, 2)), dtype=np.uint8) for _ in range(count)]


def test_pad_and_normalize_equals_the_dataloader_collate_of_normalized_images() -> None:
    images, aug = _uint8_images(12), AugmentationConfig()
    pixels, padding_mask = pad_and_normalize(images, aug.mean, aug.std)
    reference = pad_and_collate([(normalize_image(torch.from_numpy(i), aug.mean, aug.std), {}) for i in images])
    assert torch.equal(pixels, reference.images) and torch.equal(padding_mask, reference.padding_mask)
    empty, empty_mask = pad_and_normalize([], aug.mean, aug.std)
    assert empty.shape == (0, 3, 0, 0) and empty_mask.shape == (0, 0, 0)


def test_both_collates_record_the_sizes_the_mask_holds_and_keep_them_on_the_host() -> None:
    images, aug = _uint8_images(5, seed=1), AugmentationConfig()
    loader_batch = pad_and_collate([(normalize_image(torch.from_numpy(i), aug.mean, aug.std), {}) for i in images])
    rows = {
        "image": images,
        "boxes": [np.zeros(0, np.float32)] * 5,
        "labels": [np.zeros(0, np.int64)] * 5,
        "image_id": np.arange(5),
        "orig_size": np.stack([i.shape[1:] for i in images]),
        "size": np.stack([i.shape[1:] for i in images]),
        "corrupt": np.array([False, True, False, False, False]),  # a corrupt row is dropped, not sized
    }
    ray_batch = DetectionCollateFn(aug.mean, aug.std)(rows)
    assert loader_batch.image_sizes == valid_image_sizes(loader_batch.padding_mask)
    assert (
        ray_batch.image_sizes
        == valid_image_sizes(ray_batch.padding_mask)
        == [tuple(images[i].shape[1:]) for i in (0, 2, 3, 4)]
    )
    assert ray_batch.to("cpu").image_sizes == ray_batch.image_sizes
