r"""Single-process probe of a training recipe: the main job's model, loss, optimizer, schedule and data, without Ray.

    .venv/bin/python benchmarks/recipe_probe.py                                   # configs/default.yaml
    .venv/bin/python benchmarks/recipe_probe.py --set optimizer.lr=1e-4 --eval-every 3
    .venv/bin/python benchmarks/recipe_probe.py --config configs/default.yaml \
        --config configs/variants/conditional_detr.yaml       # --config replaces the default: list it first

How the default was sized (README, "Runtime and AP here"): several recipes side by side, each in its own process
pinned to one thread, as the main job's two Ray Train workers are. One step here takes the batch of all the job's
workers together (``scaling.num_workers`` x ``data.loader.batch_size``): the same gradient as the job's DDP step
(per-worker losses over the mean box count, gradients averaged), so the AP at a given epoch is the job's up to
the order of the images. Prints one JSON line per evaluation (val AP and AP50 from pycocotools on the whole val
set, the epoch's mean training loss, train images/s, wall seconds); images/s here is not the job's (no Ray Data, one process).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass

import torch

from pipelines.cli import add_config_arguments, configure_logging, fail, load_or_exit
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.distributed_eval import evaluate, ground_truth_coco
from pipelines.run_setup import resolve_data
from sd_detr.data.config import LoaderConfig
from sd_detr.data.dataset import build_dataloader
from sd_detr.data.meta import load_meta
from sd_detr.engine import build_criterion, build_lr_scheduler, build_optimizer, train_step
from sd_detr.model import Detector, build_detector

logger = logging.getLogger("benchmarks.recipe_probe")


@dataclass
class ProbeResult:
    """What a probe leaves: one record per evaluation and the trained model."""

    records: list[dict[str, float]]
    model: Detector


def probe(cfg: TrainJobConfig, eval_every: int) -> ProbeResult:
    """:func:`train_and_evaluate` on ``cfg`` with its data resolved (``ValueError``/``FileNotFoundError`` from
    :func:`pipelines.run_setup.resolve_data` when the data do not fit the config, before any training)."""
    return train_and_evaluate(resolve_data(cfg.with_absolute_paths()), eval_every)


def train_and_evaluate(cfg: TrainJobConfig, eval_every: int) -> ProbeResult:
    """Train ``cfg`` (data resolved) for ``cfg.optimizer.epochs`` epochs in this process and evaluate every
    ``eval_every`` epochs and after the last -> one record per evaluation (epoch, AP, AP50, that epoch's mean
    training loss, train images/s, wall seconds)."""
    torch.manual_seed(cfg.training.seed)
    model = build_detector(cfg.model, seed=cfg.training.seed)
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer)
    global_batch = cfg.data.loader.model_copy(
        update={"batch_size": cfg.data.loader.batch_size * cfg.scaling.num_workers}
    )
    train = build_dataloader(cfg.data.train_dir, cfg.data.augmentation, global_batch, train=True)
    val = build_dataloader(
        cfg.data.val_dir, cfg.data.augmentation, LoaderConfig(batch_size=8, shuffle="none"), train=False
    )
    ground_truth = ground_truth_coco(cfg.data.val_dir)
    categories = torch.tensor(load_meta(cfg.data.val_dir).category_ids.tolist())
    started, train_seconds, images, records = time.perf_counter(), 0.0, 0, []
    for epoch in range(cfg.optimizer.epochs):
        train.dataset.set_epoch(epoch)
        epoch_start = time.perf_counter()
        epoch_losses = []
        for batch in train:
            losses = train_step(
                model,
                criterion,
                optimizer,
                batch.images,
                batch.padding_mask,
                batch.targets,
                cfg.optimizer.grad_clip_norm,
                image_sizes=batch.image_sizes,
            )
            epoch_losses.append(float(losses.total.detach()))
            images += len(batch.targets)
        scheduler.step()
        train_seconds += time.perf_counter() - epoch_start
        if (epoch + 1) % eval_every and epoch + 1 != cfg.optimizer.epochs:
            continue
        stats = evaluate(model, val, ground_truth, categories, torch.device("cpu"), None).coco_stats()
        record = {
            "epoch": epoch + 1,
            "AP": round(stats["AP"], 4),
            "AP50": round(stats["AP50"], 4),
            "train_loss": round(sum(epoch_losses) / len(epoch_losses), 4),
            "train_images_per_s": round(images / train_seconds, 1),
            "wall_s": round(time.perf_counter() - started),
        }
        logger.info(json.dumps(record))
        records.append(record)
    return ProbeResult(records, model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--eval-every", type=int, default=3, help="Epochs between evaluations (and the last).")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 = one job worker's share).")
    args = parser.parse_args(argv)
    if args.eval_every < 1 or args.threads < 1:
        parser.error("--eval-every and --threads must be at least 1")
    configure_logging()
    cfg = load_or_exit(TrainJobConfig, args.config, args.set, DEFAULT_CONFIG)
    torch.set_num_threads(args.threads)
    try:
        cfg = resolve_data(cfg.with_absolute_paths())
    except (FileNotFoundError, ValueError) as error:  # data that do not fit the config: before any training
        fail(str(error))
    train_and_evaluate(cfg, args.eval_every)


if __name__ == "__main__":
    main()
