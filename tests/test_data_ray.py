"""Ray Data path: same batches as the DataLoader path, seeded, corrupt rows counted, 2 TorchTrainer workers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from sd_detr.data.collate import DetectionBatch
from sd_detr.data.config import AugmentationConfig, LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import load_meta

pytestmark = pytest.mark.ray


def _ids(batches: list[DetectionBatch]) -> list[int]:
    return [int(t["image_id"]) for b in batches for t in b.targets]


def _same(a: list[DetectionBatch], b: list[DetectionBatch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images)
        and torch.equal(x.padding_mask, y.padding_mask)
        and all(torch.equal(s["boxes"], t["boxes"]) for s, t in zip(x.targets, y.targets, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def test_ray_eval_batches_equal_the_dataloader_batches(ray_local, synthetic_root: Path) -> None:
    from pipelines.ray_data import build_detection_dataset
    from pipelines.torch_batches import iter_detection_batches

    aug, loader = AugmentationConfig(), LoaderConfig(batch_size=4, decode_batch_size=4)
    ray_batches = list(
        iter_detection_batches(build_detection_dataset(synthetic_root / "val", aug, loader, train=False), loader, aug)
    )
    torch_batches = list(build_dataloader(synthetic_root / "val", aug, loader, train=False))
    assert _ids(ray_batches) == _ids(torch_batches) and len(_ids(ray_batches)) == 6
    assert _same(ray_batches, torch_batches)
    for batch in ray_batches:
        assert batch.images.dtype == torch.float32 and batch.padding_mask.dtype == torch.bool
        for target in batch.targets:
            assert set(target) == {"boxes", "labels", "image_id", "orig_size", "size"}
            assert target["labels"].dtype == torch.int64 and target["orig_size"].dtype == torch.int64


def test_materialized_val_set_gives_the_streamed_batches_every_epoch(ray_local, synthetic_root: Path) -> None:
    from ray.data.dataset import MaterializedDataset

    from pipelines.ray_data import build_datasets
    from pipelines.torch_batches import iter_detection_batches

    aug = AugmentationConfig()
    cached_loader = LoaderConfig(batch_size=4, decode_batch_size=4)
    streamed_loader = cached_loader.model_copy(update={"materialize_val": False})
    cached = build_datasets(synthetic_root / "train", synthetic_root / "val", aug, cached_loader)["val"]
    streamed = build_datasets(synthetic_root / "train", synthetic_root / "val", aug, streamed_loader)["val"]
    assert isinstance(cached, MaterializedDataset) and not isinstance(streamed, MaterializedDataset)
    reference = list(iter_detection_batches(streamed, streamed_loader, aug))
    for _ in range(2):  # read again at every evaluation
        assert _same(list(iter_detection_batches(cached, cached_loader, aug)), reference)
    assert len(_ids(reference)) == 6


@pytest.mark.parametrize("shuffle", ["rows", "window"])
def test_ray_train_pipeline_is_seeded_and_varies_per_epoch(ray_local, synthetic_root: Path, shuffle: str) -> None:
    from pipelines.ray_data import build_detection_dataset
    from pipelines.torch_batches import iter_detection_batches

    aug = AugmentationConfig()

    def epochs(seed: int, count: int) -> list[list[DetectionBatch]]:
        loader = LoaderConfig(batch_size=4, seed=seed, decode_batch_size=4, shuffle=shuffle)
        dataset = build_detection_dataset(synthetic_root / "train", aug, loader, train=True)
        return [list(iter_detection_batches(dataset, loader, aug)) for _ in range(count)]

    first_run, second_run, other_seed = epochs(0, 2), epochs(0, 1), epochs(1, 1)
    assert sorted(_ids(first_run[0])) == sorted(_ids(first_run[1])) == sorted(load_meta_ids(synthetic_root / "train"))
    assert _ids(first_run[0]) == _ids(second_run[0]) and _same(first_run[0], second_run[0])  # reproducible
    assert _ids(first_run[0]) != _ids(first_run[1])  # reshuffled per epoch
    sizes = [{int(t["image_id"]): t["size"].tolist() for b in epoch for t in b.targets} for epoch in first_run]
    assert sizes[0] != sizes[1]  # augmentation differs per epoch
    assert not _same(first_run[0], other_seed[0])


def _shard_of(dataset_dir: Path) -> dict[int, str]:
    import pyarrow.parquet as pq

    meta = load_meta(dataset_dir)
    return {
        image_id: path.name
        for path in meta.shard_paths(dataset_dir)
        for image_id in pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
    }


@pytest.mark.parametrize("window_rows", [3, None])  # ~3 rows' worth of bytes; the default (> the whole set)
def test_window_shuffle_reorders_images_inside_shards_every_epoch(
    ray_local, synthetic_root: Path, window_rows: int | None
) -> None:
    from pipelines.ray_data import build_detection_dataset
    from pipelines.torch_batches import iter_detection_batches
    from pipelines.window_shuffle import shuffle_window_rows

    train_dir, aug = synthetic_root / "train", AugmentationConfig()
    window_mb = LoaderConfig().shuffle_window_mb
    meta = load_meta(train_dir)
    row_bytes = sum(p.stat().st_size for p in meta.shard_paths(train_dir)) / meta.counts.images
    if window_rows is not None:
        window_mb = (window_rows + 0.5) * row_bytes / 2**20
        assert shuffle_window_rows(train_dir, window_mb) == window_rows
    else:  # a window never exceeds a quarter of Ray Data's object-store budget (half the store)
        budget = ray_local.cluster_resources()["object_store_memory"] / 2
        assert shuffle_window_rows(train_dir, 1e6) == int(budget / 4 / row_bytes)
    shard_of = _shard_of(train_dir)
    largest = max(set(shard_of.values()), key=list(shard_of.values()).count)
    assert list(shard_of.values()).count(largest) >= 4

    def run(shuffle: str, seed: int, count: int) -> list[list[int]]:
        loader = LoaderConfig(
            batch_size=4, decode_batch_size=4, seed=seed, shuffle=shuffle, shuffle_window_mb=window_mb
        )
        dataset = build_detection_dataset(train_dir, aug, loader, train=True)
        return [_ids(list(iter_detection_batches(dataset, loader, aug))) for _ in range(count)]

    def inside(order: list[int]) -> list[int]:
        return [i for i in order if shard_of[i] == largest]

    epochs = run("window", 0, 3)
    assert all(sorted(order) == sorted(shard_of) for order in epochs)  # every image exactly once per epoch
    assert len({tuple(inside(order)) for order in epochs}) > 1  # image order inside a shard changes
    assert run("window", 0, 1)[0] == epochs[0]  # a rerun with the same seed: the same order
    assert run("window", 1, 1)[0] != epochs[0]
    files_only = run("files", 0, 3)  # what 'files' does: shard order changes, the order inside never
    assert len({tuple(inside(order)) for order in files_only}) == 1


def load_meta_ids(dataset_dir: Path) -> list[int]:
    from sd_detr.data.shards import iter_row_groups, read_row_group

    meta = load_meta(dataset_dir)
    return [
        r["image_id"]
        for p, g in iter_row_groups(meta.shard_paths(dataset_dir))
        for r in read_row_group(p, g, ["image_id"])
    ]


def test_ray_skips_and_counts_a_corrupt_row(ray_local, corrupt_shard_dir) -> None:
    from pipelines.ray_data import build_detection_dataset
    from pipelines.torch_batches import iter_detection_batches

    shard_dir, corrupt_id = corrupt_shard_dir
    aug, loader = AugmentationConfig(), LoaderConfig(batch_size=2, decode_batch_size=2)
    batches = list(iter_detection_batches(build_detection_dataset(shard_dir, aug, loader, train=True), loader, aug))
    assert sum(b.num_corrupt for b in batches) == 1
    assert [i for b in batches for i in b.corrupt_image_ids] == [corrupt_id]
    assert sorted(_ids(batches)) == sorted(i for i in load_meta_ids(shard_dir) if i != corrupt_id)


def _worker_loop(config: dict) -> None:
    """Runs in each Train worker: iterate the train shard and the full val set once, record image ids."""
    import ray.train

    from pipelines.torch_batches import iter_detection_batches

    loader, aug = LoaderConfig(**config["loader"]), AugmentationConfig()
    context = ray.train.get_context()
    seen = {"world_size": context.get_world_size(), "train": [], "val": [], "corrupt": 0}
    for name in ("train", "val"):
        for batch in iter_detection_batches(ray.train.get_dataset_shard(name), loader, aug):
            assert batch.images.shape[0] == len(batch.targets) == batch.padding_mask.shape[0]
            seen[name] += [int(t["image_id"]) for t in batch.targets]
            seen["corrupt"] += batch.num_corrupt
    Path(config["out_dir"], f"rank{context.get_world_rank()}.json").write_text(json.dumps(seen))


def test_torch_trainer_workers_each_get_their_share(ray_local, synthetic_root: Path, tmp_path: Path) -> None:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_data import build_data_config, build_datasets

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    aug, loader = AugmentationConfig(), LoaderConfig(batch_size=2, decode_batch_size=4)
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"loader": loader.model_dump(), "out_dir": str(tmp_path)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="data-shares", storage_path=str(tmp_path / "ray_results")),
        datasets=build_datasets(synthetic_root / "train", synthetic_root / "val", aug, loader),
        dataset_config=build_data_config(loader),
    )
    result = trainer.fit()
    assert result.error is None
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train_ids = sorted(load_meta_ids(synthetic_root / "train"))
    val_ids = sorted(load_meta_ids(synthetic_root / "val"))
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [len(r["train"]) for r in ranks] == [6, 6]  # equal halves of the 12 train images
    assert not set(ranks[0]["train"]) & set(ranks[1]["train"])
    assert sorted(ranks[0]["train"] + ranks[1]["train"]) == train_ids
    assert [sorted(r["val"]) for r in ranks] == [val_ids, val_ids]  # val is not split: full set per worker
    assert [r["corrupt"] for r in ranks] == [0, 0]


def test_drop_last_drops_no_val_image(ray_local, synthetic_root: Path) -> None:
    from pipelines.ray_data import build_detection_dataset
    from pipelines.torch_batches import iter_detection_batches

    val_dir = synthetic_root / "val"  # 6 images: batches of 4 leave an incomplete last batch
    aug, loader = AugmentationConfig(), LoaderConfig(batch_size=4, decode_batch_size=4, drop_last=True)
    val = build_detection_dataset(val_dir, aug, loader, train=False)
    assert sorted(_ids(list(iter_detection_batches(val, loader, aug)))) == sorted(load_meta_ids(val_dir))
    assert len(_ids(list(iter_detection_batches(val, loader, aug, train=True)))) == 4  # training drops it
