"""Plain `torch.utils.data` access to the shards (no Ray): tests, benchmarks, single-process tools.

The training pipeline streams the same shards with Ray Data (`pipelines/ray_data.py`); both paths decode
with `sd_detr.data.samples.decode_row`. This path normalizes per image and batches with `pad_and_collate`,
the Ray path ships uint8 and batches with `pad_and_normalize`: the same values.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sd_detr.data.collate import pad_and_collate
from sd_detr.data.config import AugmentationConfig, LoaderConfig
from sd_detr.data.meta import load_meta
from sd_detr.data.samples import CorruptSample, Target, decode_row, row_seed
from sd_detr.data.shards import iter_row_groups, read_row_group
from sd_detr.data.transforms import DetectionTransform, build_transform


class ShardDataset(IterableDataset):
    """Iterates the rows of a shard directory as `(image, target)` pairs or `CorruptSample`s.

    Row groups are spread over DataLoader workers; with `shuffle`, row-group order and the rows inside
    each group are permuted per epoch (call `set_epoch`). Augmentation of each row is seeded by
    (seed, image_id, epoch) when `seed` is set, so results do not depend on the number of workers.
    """

    def __init__(
        self,
        dataset_dir: Path | str,
        transform: DetectionTransform,
        *,
        shuffle: bool = False,
        seed: int | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.dataset_dir = Path(dataset_dir)
        self.meta = load_meta(self.dataset_dir)
        self.transform = transform
        self.shuffle = shuffle
        self.seed = seed
        self.normalize = normalize
        self.epoch = 0
        # One order seed shared by all DataLoader workers (they must agree on the permutation they split).
        self._order_seed = seed if seed is not None else int(np.random.SeedSequence().entropy % 2**63)
        self.units = list(iter_row_groups(self.meta.shard_paths(self.dataset_dir)))

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (changes shuffling and augmentation)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.meta.counts.images

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self._order_seed, self.epoch, *keys])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Target] | CorruptSample]:
        order = self._rng(0).permutation(len(self.units)) if self.shuffle else np.arange(len(self.units))
        info = get_worker_info()
        if info is not None:
            order = order[info.id :: info.num_workers]
        for unit_index in order:
            path, group = self.units[unit_index]
            rows = read_row_group(path, group)
            if self.shuffle:
                rows = [rows[i] for i in self._rng(1, int(unit_index)).permutation(len(rows))]
            for row in rows:
                seed = None if self.seed is None else row_seed(self.seed, int(row["image_id"]), self.epoch)
                yield decode_row(row, self.meta, self.transform, seed=seed, normalize=self.normalize)


def build_dataloader(
    dataset_dir: Path | str,
    aug: AugmentationConfig,
    loader: LoaderConfig,
    *,
    train: bool,
    num_workers: int = 0,
) -> DataLoader:
    """A `DataLoader` of `DetectionBatch`es over one shard directory (train: shuffled, augmented, and
    `loader.drop_last` applied; otherwise every image is batched).

    Call `dataloader.dataset.set_epoch(epoch)` before each epoch to vary shuffling and augmentation.
    """
    dataset = ShardDataset(
        dataset_dir,
        build_transform(aug, train=train),
        shuffle=train and loader.shuffle != "none",
        seed=loader.seed,
    )
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        collate_fn=pad_and_collate,
        num_workers=num_workers,
        drop_last=loader.drop_last and train,  # evaluation must see every image
        persistent_workers=False,
    )
