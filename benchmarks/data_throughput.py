"""Images/s of the Ray Data path and of a plain `torch.utils.data.DataLoader` over the same shards.

Both paths decode the same Parquet shards with the same train augmentation (`AugmentationConfig()`),
seed, batch size and padded, normalized batches, and both visit every image once per epoch in an order that
changes every epoch. The Ray path is the one training uses (`build_detection_dataset` +
`iter_detection_batches`), iterated on the driver like one Train worker's shard, with as many Ray CPUs as
DataLoader workers (`build_dataloader`, `--cpus`). Both are measured in this one run, epochs alternating
between the paths, after one warm-up epoch each (worker processes, Ray's first execution).

    python benchmarks/data_throughput.py [--data data/synthetic/train] [--epochs 3] [--batch-size 8] [--shuffle rows]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterable
from pathlib import Path

import ray

from pipelines.ray_data import build_detection_dataset
from pipelines.torch_batches import iter_detection_batches
from sd_detr.data.builtin import ensure_synthetic_dataset
from sd_detr.data.collate import DetectionBatch
from sd_detr.data.config import AugmentationConfig, LoaderConfig
from sd_detr.data.dataset import build_dataloader


def _epoch_rate(batches: Iterable[DetectionBatch]) -> tuple[int, float, float]:
    """(images, seconds, seconds until the first batch) of one pass over `batches`."""
    started = time.perf_counter()
    images, first = 0, 0.0
    for batch in batches:
        if not first:
            first = time.perf_counter() - started
        images += len(batch)
    return images, time.perf_counter() - started, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, help="shard directory (default: the synthetic train split)")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per path (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="DataLoader workers = Ray CPUs")
    parser.add_argument(
        "--shuffle", choices=["none", "files", "window", "rows"], default="rows", help="LoaderConfig.shuffle"
    )
    args = parser.parse_args()
    data = args.data or ensure_synthetic_dataset(progress=True) / "train"
    aug, loader = AugmentationConfig(), LoaderConfig(batch_size=args.batch_size, seed=0, shuffle=args.shuffle)

    dataloader = build_dataloader(data, aug, loader, train=True, num_workers=args.cpus)
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = build_detection_dataset(data, aug, loader, train=True)

    def epoch(path: str, index: int) -> Iterable[DetectionBatch]:
        if path == "torch":
            dataloader.dataset.set_epoch(index)
            return dataloader
        return iter_detection_batches(dataset, loader, aug, train=True)

    # Epochs alternate between the two paths so that a change in machine load hits both alike.
    totals = {"ray": [0, 0.0, 0.0], "torch": [0, 0.0, 0.0]}
    warmup = {}
    for index in range(args.epochs + 1):
        for path in ("torch", "ray"):
            images, seconds, first = _epoch_rate(epoch(path, index))
            if index == 0:
                warmup[path] = seconds
            else:
                totals[path][0] += images
                totals[path][1] += seconds
                totals[path][2] += first / args.epochs
    ray.shutdown()
    rates = {path: images / seconds for path, (images, seconds, _) in totals.items()}

    print(
        f"data {data} | batch {args.batch_size} | shuffle {args.shuffle} | {args.cpus} CPU(s) | "
        f"{args.epochs} timed epochs after 1 warm-up"
    )
    print(f"{'path':<28}{'images/s':>10}{'first batch s':>16}{'warm-up epoch s':>18}")
    for path, name in (("ray", "Ray Data (driver iterator)"), ("torch", "torch DataLoader")):
        print(f"{name:<28}{rates[path]:>10.1f}{totals[path][2]:>16.2f}{warmup[path]:>18.1f}")
    print(f"ratio Ray Data / DataLoader: {rates['ray'] / rates['torch']:.2f}")


if __name__ == "__main__":
    main()
