"""Distributed evaluation and per-rank seeds: the val set split into exact shares, rank 0 scoring the gathered
detections like one process does, and the same weights giving the same AP in training, with 1 or 2 Ray Train
workers and in `pipelines/evaluate.py` at any batch size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.config import TrainJobConfig
from pipelines.ddp import build_worker_detector, seed_worker, worker_seed
from pipelines.distributed_eval import evaluate, ground_truth_coco
from pipelines.row_selection import split_rows
from sd_detr.config import load_config
from sd_detr.data.collate import pad_and_collate
from sd_detr.data.dataset import ShardDataset
from sd_detr.data.meta import load_meta
from sd_detr.data.transforms import build_transform
from sd_detr.evaluation import COCO_STAT_NAMES
from tests.pipeline_helpers import REPO, TINY_OVERRIDES, tiny_job_config


def _tiny_config(dataset_dir: Path | str | None = None) -> TrainJobConfig:
    """The tiny test model; sized for ``dataset_dir``'s categories when given."""
    classes = [f"model.num_classes={load_meta(dataset_dir).num_classes}"] if dataset_dir is not None else []
    return load_config(TrainJobConfig, REPO / "configs" / "default.yaml", [*TINY_OVERRIDES, *classes])


def _file_order_ids(dataset_dir: Path) -> list[int]:
    import pyarrow.parquet as pq

    meta = load_meta(dataset_dir)
    return [i for p in meta.shard_paths(dataset_dir) for i in pq.read_table(p, columns=["image_id"])["image_id"].to_pylist()]  # fmt: skip


# ---- exact val shares --------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts", [1, 2, 4, 8])
def test_val_shares_hold_every_image_exactly_once(synthetic_root: Path, parts: int) -> None:
    val_dir = synthetic_root / "val"
    ids = _file_order_ids(val_dir)
    shares = split_rows(val_dir, parts)
    assert len(shares) == parts
    assert [i for share in shares for i in share.image_ids] == ids  # disjoint, complete, in file order
    sizes = [len(share.image_ids) for share in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert (0 in sizes) == (parts > len(ids))
    shard_files = {str(p) for p in load_meta(val_dir).shard_paths(val_dir)}
    for share in shares:
        assert share.shard_paths and set(share.shard_paths) <= shard_files


def test_val_shares_refuse_zero_parts(synthetic_root: Path) -> None:
    with pytest.raises(ValueError, match="0 parts"):
        split_rows(synthetic_root / "val", 0)


@pytest.mark.ray
@pytest.mark.parametrize("materialize", [True, False])
def test_val_share_datasets_decode_exactly_their_share(ray_local, synthetic_root: Path, materialize: bool) -> None:
    from ray.data.dataset import MaterializedDataset

    from pipelines.ray_data import build_datasets
    from pipelines.row_selection import val_share_name
    from pipelines.torch_batches import iter_detection_batches

    cfg = _tiny_config()
    loader = cfg.data.loader.model_copy(update={"materialize_val": materialize})
    datasets = build_datasets(synthetic_root / "train", synthetic_root / "val", cfg.data.augmentation, loader, 8)
    assert "val" not in datasets and len([name for name in datasets if name.startswith("val_rank")]) == 8
    seen = []
    for rank, share in enumerate(split_rows(synthetic_root / "val", 8)):
        dataset = datasets[val_share_name(rank)]
        assert isinstance(dataset, MaterializedDataset) == materialize
        ids = [int(t["image_id"]) for b in iter_detection_batches(dataset, loader, cfg.data.augmentation) for t in b.targets]  # fmt: skip
        assert ids == list(share.image_ids)  # ranks 6 and 7 get nothing, and iterate without error
        seen += ids
    assert seen == _file_order_ids(synthetic_root / "val")


# ---- per-rank random streams -------------------------------------------------------------------------------


def test_ranks_share_initial_weights_but_not_random_streams() -> None:
    model_config = load_config(
        TrainJobConfig, REPO / "configs" / "default.yaml", [*TINY_OVERRIDES, "model.transformer.dropout=0.1"]
    ).model
    models, masks = [], []
    for rank in (0, 1, 0):
        model = build_worker_detector(model_config, seed=3, rank=rank)
        dropout = next(m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0)
        dropout.train()
        models.append(model.state_dict())
        masks.append(dropout(torch.ones(4096)) == 0)
    for name, tensor in models[0].items():
        assert torch.equal(tensor, models[1][name]), name  # DDP needs identical initial weights
    assert not torch.equal(masks[0], masks[1])  # ranks draw different dropout masks
    assert torch.equal(masks[0], masks[2])  # reproducible per rank
    other_seed = build_worker_detector(model_config, seed=4, rank=0).state_dict()
    assert any(not torch.equal(t, other_seed[n]) for n, t in models[0].items())


def test_worker_seeds_differ_per_rank_and_epoch_and_reseed_torch() -> None:
    seeds = {worker_seed(0, rank, epoch) for rank in range(8) for epoch in range(8)}
    assert len(seeds) == 64
    assert worker_seed(1, 0) != worker_seed(0, 1)  # not seed + rank
    assert seed_worker(5, 2, 3) == worker_seed(5, 2, 3)
    first = torch.rand(3)
    seed_worker(5, 2, 3)
    assert torch.equal(torch.rand(3), first)
    with pytest.raises(ValueError, match="rank"):
        worker_seed(0, -1)


# ---- gathering on a real process group (gloo, no Ray) -------------------------------------------------------

_SHARES = [[0, 1, 2, 3], [4, 5], []]  # positions in file order: uneven, and one rank with nothing to evaluate
_BATCH = 2  # shares of even size keep the batches of one process: the comparison cannot hinge on padding


def _batches(val_dir: Path, positions: list[int]) -> list:
    cfg = _tiny_config()
    samples = list(ShardDataset(val_dir, build_transform(cfg.data.augmentation, train=False), shuffle=False))
    chosen = [samples[p] for p in positions]
    return [pad_and_collate(chosen[i : i + _BATCH]) for i in range(0, len(chosen), _BATCH)]


def _evaluate_rank(rank: int, world: int, val_dir: str, store: str, out: str, keep: int) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        cfg = _tiny_config(val_dir)
        model = build_worker_detector(cfg.model, seed=0, rank=rank).eval()
        labels = torch.as_tensor(load_meta(val_dir).category_ids, dtype=torch.int64)
        truth = ground_truth_coco(val_dir) if rank == 0 else None
        batches = _batches(Path(val_dir), _SHARES[rank])
        evaluation = evaluate(model, batches, truth, labels, torch.device("cpu"), None, keep_images=keep)
        assert (evaluation is None) == (rank != 0)
        if evaluation is not None:
            kept = [int(target["image_id"]) for _, target, _ in evaluation.kept]
            Path(out).write_text(json.dumps({"metrics": evaluation.metrics, "kept": kept}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_evaluation_equals_one_process(synthetic_root: Path, tmp_path: Path) -> None:
    val_dir = synthetic_root / "val"
    keep = 5  # rank 0 holds 4: the fifth kept image comes from rank 1
    out = tmp_path / "rank0.json"
    mp.spawn(_evaluate_rank, args=(3, str(val_dir), str(tmp_path / "store"), str(out), keep), nprocs=3)
    gathered = json.loads(out.read_text())

    cfg = _tiny_config(val_dir)
    model = build_worker_detector(cfg.model, seed=0, rank=0).eval()
    labels = torch.as_tensor(load_meta(val_dir).category_ids, dtype=torch.int64)
    single = evaluate(model, _batches(val_dir, list(range(6))), ground_truth_coco(val_dir), labels,
                      torch.device("cpu"), None, keep_images=keep)  # fmt: skip
    ids = _file_order_ids(val_dir)
    assert gathered["metrics"]["val_images"] == single.metrics["val_images"] == len(ids) == 6
    assert gathered["kept"] == [int(t["image_id"]) for _, t, _ in single.kept] == ids[:keep]
    for name in (*COCO_STAT_NAMES, "score_iou_spearman", "score_iou_pearson", "best_regressed_recall"):
        assert gathered["metrics"][f"val_{name}"] == pytest.approx(single.metrics[f"val_{name}"], abs=1e-9, nan_ok=True)


# ---- the acceptance test: one set of weights, one AP ---------------------------------------------------------


def _evaluate_checkpoint_loop(config: dict) -> None:
    """Runs in each Train worker: the training loop's evaluation of a saved checkpoint on this rank's share."""
    import ray.train

    from pipelines.distributed_eval import evaluate, ground_truth_coco
    from pipelines.inference import load_checkpoint_model
    from pipelines.row_selection import val_share_name
    from pipelines.torch_batches import iter_detection_batches

    cfg = TrainJobConfig.model_validate(config["config"])
    rank = ray.train.get_context().get_world_rank()
    loaded = load_checkpoint_model(config["checkpoint"])
    batches = iter_detection_batches(
        ray.train.get_dataset_shard(val_share_name(rank)), cfg.data.loader, cfg.data.augmentation
    )
    truth = ground_truth_coco(cfg.data.val_dir) if rank == 0 else None
    labels = torch.tensor(loaded.category_ids, dtype=torch.int64)
    evaluation = evaluate(loaded.model, batches, truth, labels, torch.device("cpu"), None)
    if evaluation is not None:
        Path(config["out"]).write_text(json.dumps(evaluation.metrics))


def _evaluate_on_workers(cfg: TrainJobConfig, checkpoint: str, workers: int, out: Path) -> dict[str, float]:
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_data import build_data_config, build_datasets

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    data, loader = cfg.data, cfg.data.loader
    trainer = TorchTrainer(
        _evaluate_checkpoint_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "checkpoint": checkpoint, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name=f"eval-{workers}", storage_path=str(out.parent / "ray_eval")),
        datasets=build_datasets(data.train_dir, data.val_dir, data.augmentation, loader, val_shares=workers),
        dataset_config=build_data_config(loader),
    )
    assert trainer.fit().error is None
    return json.loads(out.read_text())


@pytest.mark.ray
@pytest.mark.slow
def test_same_weights_give_the_same_ap_with_any_worker_count_and_batch_size(
    ray_local, synthetic_root: Path, tmp_path: Path
) -> None:
    from pipelines.evaluate import evaluate_shards
    from pipelines.inference import load_checkpoint_model
    from pipelines.training import run_training

    cfg = tiny_job_config(tmp_path, synthetic_root, "eval-parity", epochs=1, extra=["tracking.register_model=false"])
    assert cfg.scaling.num_workers == 2
    outcome = run_training(cfg)  # the training-time evaluation on 2 workers (3 val images each)
    trained = {f"val_{name}": outcome.metrics[f"val_{name}"] for name in COCO_STAT_NAMES}
    assert outcome.metrics["val_images"] == 6

    one_worker = _evaluate_on_workers(cfg, outcome.checkpoint_path, 1, tmp_path / "one_worker.json")
    assert one_worker["val_images"] == 6
    for key in (*trained, "val_score_iou_spearman", "val_score_iou_pearson", "val_best_regressed_recall"):
        assert one_worker[key] == pytest.approx(outcome.metrics[key], abs=1e-6, nan_ok=True), key

    # evaluate.py's code at batch sizes 1 and 8: the 12 COCO statistics, and the score-IoU correlations, which
    # depend on every detection's score and box (a barely trained model's AP can be 0 at any batch size)
    loaded = load_checkpoint_model(outcome.checkpoint_path)
    for batch_size in (1, 8):
        metrics = evaluate_shards(loaded, synthetic_root / "val", batch_size).metrics
        for key in (*trained, "val_score_iou_spearman", "val_score_iou_pearson", "val_best_regressed_recall"):
            assert metrics[key] == pytest.approx(outcome.metrics[key], abs=1e-6, nan_ok=True), (key, batch_size)
    stats_file = tmp_path / "stats.json"
    cli = subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "evaluate.py"), "--model", outcome.checkpoint_path,
         "--data", str(synthetic_root / "val"), "--batch-size", "8", "--out", str(stats_file)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert json.loads(stats_file.read_text()) == pytest.approx({k.removeprefix("val_"): v for k, v in trained.items()})
