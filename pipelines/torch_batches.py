"""`DetectionBatch`es from the decoded rows of a Ray Dataset (`pipelines/ray_data.py`) or of a Train worker's shard.

The rows carry uint8 images; the collate pads and normalizes them per batch (`pad_and_normalize`, NumPy, in
Ray's iterator thread) and returns a `DetectionBatch`, not a Ray tensor batch, so Ray leaves it on the CPU:
call `batch.to(device)`. Rows flagged corrupt by the decode stage are dropped here and counted.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from ray.data import DataIterator, Dataset
from ray.data.collate_fn import NumpyBatchCollateFn

from sd_detr.data.collate import DetectionBatch, pad_and_normalize
from sd_detr.data.config import IMAGENET_MEAN, IMAGENET_STD, AugmentationConfig, LoaderConfig
from sd_detr.data.samples import Target


class DetectionCollateFn(NumpyBatchCollateFn):
    """Rows of `DecodeTransform` -> `DetectionBatch` (normalized, padded; corrupt rows counted, dropped)."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, batch: dict[str, np.ndarray]) -> DetectionBatch:
        images: list[np.ndarray] = []
        targets: list[Target] = []
        corrupt_ids: list[int] = []
        for index, image_id in enumerate(batch["image_id"]):
            if bool(batch["corrupt"][index]):
                corrupt_ids.append(int(image_id))
                continue
            images.append(np.asarray(batch["image"][index]))
            targets.append(
                {
                    "boxes": torch.tensor(np.asarray(batch["boxes"][index], dtype=np.float32)).reshape(-1, 4),
                    "labels": torch.tensor(np.asarray(batch["labels"][index], dtype=np.int64)),
                    "image_id": torch.tensor(int(image_id), dtype=torch.int64),
                    "orig_size": torch.tensor(np.asarray(batch["orig_size"][index], dtype=np.int64)),
                    "size": torch.tensor(np.asarray(batch["size"][index], dtype=np.int64)),
                }
            )
        pixels, padding_mask = pad_and_normalize(images, self.mean, self.std)
        sizes = [(int(image.shape[1]), int(image.shape[2])) for image in images]
        return DetectionBatch(pixels, padding_mask, targets, len(corrupt_ids), corrupt_ids, sizes)


def iter_detection_batches(
    data: Dataset | DataIterator,
    loader: LoaderConfig,
    aug: AugmentationConfig | None = None,
    *,
    train: bool = False,
) -> Iterable[DetectionBatch]:
    """`DetectionBatch`es (on CPU) of a dataset or of a Train worker's `get_dataset_shard(...)`.

    `loader.drop_last` applies only with `train=True`: evaluation must see every image (COCO AP is computed
    on the images that got predictions), so the default never drops a batch.
    `len(batch)` can be below `batch_size` (corrupt rows dropped, see `batch.num_corrupt`), and 0 if the
    whole batch was corrupt; with DDP every rank must still take part in each step.
    """
    aug = aug or AugmentationConfig()
    return data.iter_torch_batches(
        batch_size=loader.batch_size,
        collate_fn=DetectionCollateFn(aug.mean, aug.std),
        prefetch_batches=loader.prefetch_batches,
        drop_last=loader.drop_last and train,
        device="cpu",
    )
