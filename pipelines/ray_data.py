"""Ray Data reader of the Parquet shards: the datasets a `TorchTrainer` streams (the Ray-aware data code is
this module, `pipelines/torch_batches.py`, `pipelines/window_shuffle.py` and `pipelines/row_selection.py`).

    read_parquet (one block per shard file, file order shuffled per epoch) -> ['rows': random_shuffle]
    -> with_column(per-row random seed) -> ['window': random key + permute windows of encoded rows]
    -> map_batches(decode + transform, in Ray Data tasks) -> iter_torch_batches(DetectionCollateFn)

The decode stage ships uint8 images (4x smaller than float in the object store); the collate normalizes and
pads per batch (`pipelines/torch_batches.py`). A row whose image does not decode is kept as a flagged row,
logged with its image id and file name, and dropped by the collate, which counts it in `batch.num_corrupt`.

Reproducibility: with `LoaderConfig.seed` set, file order, row/window shuffle and the per-row augmentation
seed come from Ray's seeded randomness with `reseed_after_execution=True`, so every epoch differs and a rerun
gives the same epochs (given the same shards, `preserve_order=True` and the same number of workers).

In a `TorchTrainer`:

    datasets = build_datasets(train_dir, val_dir, aug, loader)
    TorchTrainer(loop, datasets=datasets, dataset_config=build_data_config(loader), ...)
    # in the worker loop
    for batch in iter_detection_batches(ray.train.get_dataset_shard("train"), loader, aug, train=True): ...
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.data import Dataset, FileShuffleConfig, RandomSeedConfig
from ray.data.expressions import random as random_column
from ray.train import DataConfig

from pipelines.row_selection import RowSelection, split_rows, val_share_name
from pipelines.window_shuffle import shuffle_window_rows, window_shuffle
from sd_detr.data.config import AugmentationConfig, LoaderConfig
from sd_detr.data.meta import DatasetMeta, load_meta
from sd_detr.data.samples import CorruptSample, decode_row, row_seed
from sd_detr.data.transforms import build_transform

logger = logging.getLogger(__name__)

AUG_SEED_COLUMN = "aug_seed"
_SHARD_COLUMNS = ["image_id", "file_name", "image", "boxes", "category_ids", "iscrowd"]
_CORRUPT_ROW = {  # placeholder fields of a row whose image does not decode (the collate drops it)
    "image": np.zeros((3, 1, 1), dtype=np.uint8),
    "boxes": np.zeros(0, dtype=np.float32),
    "labels": np.zeros(0, dtype=np.int64),
    "orig_size": np.zeros(2, dtype=np.int64),
    "size": np.zeros(2, dtype=np.int64),
}


class DecodeTransform:
    """`map_batches` function: shard rows -> decoded, transformed rows.

    Output columns (one row per input row): `image` uint8 [3, H, W], `boxes` float32 [4n] (normalized
    cxcywh, flattened), `labels` int64 [n], `image_id` int64, `orig_size`/`size` int64 [2] (h, w),
    `corrupt` bool (then `image` is a 1x1 placeholder and the collate drops the row), `file_name`.
    """

    def __init__(self, meta: DatasetMeta, aug: AugmentationConfig, *, train: bool, seeded: bool) -> None:
        self.meta = meta
        self.transform = build_transform(aug, train=train)
        self.seeded = seeded

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, list[Any]] = {
            k: [] for k in ("image", "boxes", "labels", "image_id", "orig_size", "size", "corrupt", "file_name")
        }
        for index in range(len(batch["image_id"])):
            row = {name: batch[name][index] for name in _SHARD_COLUMNS}
            seed = None
            if self.seeded:
                seed = row_seed(int(batch[AUG_SEED_COLUMN][index] * 2**32), int(row["image_id"]), 0)
            sample = decode_row(row, self.meta, self.transform, seed=seed, normalize=False)
            out["image_id"].append(int(row["image_id"]))
            out["file_name"].append(str(row["file_name"]))
            out["corrupt"].append(isinstance(sample, CorruptSample))
            if isinstance(sample, CorruptSample):
                fields = _CORRUPT_ROW
            else:
                image, target = sample
                fields = {"image": image, "boxes": target["boxes"].reshape(-1)}
                fields |= {k: target[k] for k in ("labels", "orig_size", "size")}
                fields = {k: v.numpy() for k, v in fields.items()}
            for key, value in fields.items():
                out[key].append(value)
        return {
            "image": out["image"],
            "boxes": out["boxes"],
            "labels": out["labels"],
            "image_id": np.asarray(out["image_id"], dtype=np.int64),
            "orig_size": np.stack(out["orig_size"]),
            "size": np.stack(out["size"]),
            "corrupt": np.asarray(out["corrupt"], dtype=bool),
            "file_name": np.asarray(out["file_name"], dtype=object),
        }


def _cluster_cpus() -> int:
    """Logical CPUs of the Ray cluster (1 before `ray.init`)."""
    return int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1


def _read_parquet(paths: list[str], shuffle: FileShuffleConfig | str | None) -> Dataset:
    """`read_parquet` on Ray Data's V1 Parquet datasource, one block per shard file (at least one per CPU).

    Each read block becomes one task of every later stage (shuffle map and reduce, decode), and every task
    costs scheduling, object-store and bookkeeping work in the driver, the raylet and a worker; with small
    images that overhead rivals the decode itself, so blocks are as few as the files allow, while at least one
    per cluster CPU keeps every CPU decoding (Ray's own default cuts these shards into 4x more blocks). With
    one block per file the read also fuses with the stage after it. Figures: docs/benchmarks.md.

    V1, not the V2 datasource (the default in 2.60): V2 starts fresh FooterReader actors on every execution,
    i.e. every epoch of every worker, where V1 reads the footers once, when the dataset is built (figures in
    docs/benchmarks.md). The flag is read when the dataset is created, so it is set only here.
    """
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, shuffle=shuffle, override_num_blocks=max(len(paths), _cluster_cpus()))
    finally:
        context.use_datasource_v2 = previous


def build_detection_dataset(
    dataset_dir: Path | str,
    aug: AugmentationConfig,
    loader: LoaderConfig,
    *,
    train: bool,
    rows: RowSelection | None = None,
) -> Dataset:
    """A Ray Dataset of decoded, transformed rows of one shard directory (train: shuffled + augmented).

    Train order per `loader.shuffle` (docs/data.md, "Shuffling"): 'window' = shard order + `window_shuffle`
    of the encoded rows (the COCO choice), 'rows' = global `random_shuffle`, 'files' = shard order only.

    Args:
        dataset_dir: shard directory with `_meta.json` (absolute paths are safest inside Ray workers).
        aug: augmentation config (train or eval transform).
        loader: shuffling, seeding, decode batch size and CPUs.
        train: train transform and shuffling (True) or the deterministic eval transform (False).
        rows: only these rows (read from their shard files, filtered by image id before decoding).
    """
    dataset_dir = Path(dataset_dir).resolve()
    meta = load_meta(dataset_dir)
    paths = [str(p) for p in meta.shard_paths(dataset_dir)] if rows is None else list(rows.shard_paths)
    seed = loader.seed
    shuffle_files: FileShuffleConfig | str | None = None
    if train and loader.shuffle != "none":
        shuffle_files = "files" if seed is None else FileShuffleConfig(seed=seed, reseed_after_execution=True)
    dataset = _read_parquet(paths, shuffle_files)
    if rows is not None:
        dataset = rows.apply(dataset)
    if train and loader.shuffle == "rows":
        dataset = dataset.random_shuffle(
            seed=None if seed is None else RandomSeedConfig(seed=seed, reseed_after_execution=True)
        )
    seeded = train and seed is not None
    if seeded:
        dataset = dataset.with_column(AUG_SEED_COLUMN, random_column(seed=seed, reseed_after_execution=True))
    if train and loader.shuffle == "window":
        dataset = window_shuffle(dataset, shuffle_window_rows(dataset_dir, loader.shuffle_window_mb), seed)
    dataset = dataset.map_batches(
        DecodeTransform(meta, aug, train=train, seeded=seeded),
        batch_size=loader.decode_batch_size,
        batch_format="numpy",
        num_cpus=loader.decode_num_cpus,
    )
    dataset.context.execution_options.preserve_order = loader.preserve_order
    return dataset


def build_datasets(
    train_dir: Path | str,
    val_dir: Path | str,
    aug: AugmentationConfig,
    loader: LoaderConfig,
    val_shares: int | None = None,
) -> dict[str, Dataset]:
    """Datasets for `TorchTrainer(datasets=...)`: "train" (augmented, shuffled; split across workers by
    :func:`build_data_config`) and the val set with the eval transform, in file order.

    ``val_shares=None`` gives the whole val set as "val". ``val_shares=W`` (the number of Train workers)
    gives ``val_rank0`` ... ``val_rank{W-1}`` instead: :func:`split_rows` shares, each filtered by image id
    before decoding, so worker r evaluates exactly its share (:func:`val_share_name`) and every image is
    evaluated once, whatever W; `streaming_split(equal=True)` would drop rows to equalize.

    With `loader.materialize_val` each val dataset is decoded here, once (its transform is deterministic), and
    every evaluation reads the cached blocks: an evaluation no longer starts a streaming execution inside the
    worker, which also delayed the next epoch's first train batch (figures: docs/benchmarks.md).
    """
    if val_shares is None:
        val = {"val": build_detection_dataset(val_dir, aug, loader, train=False)}
    else:
        val = {
            val_share_name(rank): build_detection_dataset(val_dir, aug, loader, train=False, rows=rows)
            for rank, rows in enumerate(split_rows(val_dir, val_shares))
        }
    if loader.materialize_val:
        val = {name: dataset.materialize() for name, dataset in val.items()}
    return {"train": build_detection_dataset(train_dir, aug, loader, train=True), **val}


def build_data_config(loader: LoaderConfig, datasets_to_split: list[str] | None = None) -> DataConfig:
    """Train's DataConfig: split only "train" across workers (`streaming_split(equal=True)` may drop a few
    rows to equalize, so never split the val set you compute COCO AP on: use :func:`build_datasets`'
    ``val_shares``); every worker gets an iterator of each other dataset and reads only what it asks for.
    Keeps `preserve_order`."""
    options = DataConfig.default_ingest_options()
    options.preserve_order = loader.preserve_order
    return DataConfig(datasets_to_split=datasets_to_split or ["train"], execution_options=options)
