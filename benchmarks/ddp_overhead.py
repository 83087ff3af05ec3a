r"""What DDP's gradient all-reduce costs the main job's step on CPU: the same training steps in
``scaling.num_workers`` processes (one thread each, gloo), once as independent replicas and once wrapped in DDP, in the same run.

    .venv/bin/python benchmarks/ddp_overhead.py                                   # configs/default.yaml, batch 2
    .venv/bin/python benchmarks/ddp_overhead.py --set data.loader.batch_size=4

Each process trains the main job's model on its own ``--steps`` batches of the built-in synthetic set (loaded and
augmented before timing, so only the step is timed), as one Ray Train worker does, without Ray. Prints one JSON
line per mode (ms per step of each process, images/s of all processes together) and the ratio DDP /
independent images/s. On a machine with as many cores as workers, independent replicas run in parallel without
waiting for each other; DDP adds the all-reduce of every gradient and waits for the slowest rank at each step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.cli import add_config_arguments, configure_logging, fail, load_or_exit
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.run_setup import resolve_data
from sd_detr.data.dataset import build_dataloader
from sd_detr.engine import build_criterion, build_optimizer, train_step
from sd_detr.model import build_detector

logger = logging.getLogger("benchmarks.ddp_overhead")
WARMUP_STEPS = 3
MODES = ("independent", "ddp")


def free_port() -> int:
    """A free TCP port on the loopback interface (for the gloo rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def time_steps(rank: int, cfg: TrainJobConfig, mode: str, steps: int, port: int, results: Any) -> None:
    """One process: train ``steps`` timed steps (after :data:`WARMUP_STEPS`) and put (rank, seconds, images)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=cfg.scaling.num_workers)
    try:
        model = build_detector(cfg.model, seed=cfg.training.seed)
        criterion = build_criterion(cfg)
        optimizer = build_optimizer(model, cfg.optimizer)
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        loader_config = cfg.data.loader.model_copy(update={"seed": rank})
        loader = build_dataloader(cfg.data.train_dir, cfg.data.augmentation, loader_config, train=True)
        batches = []
        for batch in loader:
            batches.append(batch)
            if len(batches) == WARMUP_STEPS + steps:
                break
        if len(batches) < WARMUP_STEPS + steps:
            raise ValueError(f"the train set gives {len(batches)} batches, fewer than {WARMUP_STEPS + steps}")
        dist.barrier()
        images, started = 0, 0.0
        for index, batch in enumerate(batches):
            if index == WARMUP_STEPS:
                started = time.perf_counter()
            train_step(
                model, criterion, optimizer, batch.images, batch.padding_mask, batch.targets,
                cfg.optimizer.grad_clip_norm, image_sizes=batch.image_sizes,
            )  # fmt: skip
            images += len(batch.targets) if index >= WARMUP_STEPS else 0
        results.put((rank, time.perf_counter() - started, images))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure(cfg: TrainJobConfig, mode: str, steps: int) -> dict[str, Any]:
    """Run ``mode`` ("independent" or "ddp") in ``cfg.scaling.num_workers`` processes -> one record."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=time_steps, args=(rank, cfg, mode, steps, port, results))
        for rank in range(cfg.scaling.num_workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    if any(process.exitcode != 0 for process in processes):
        raise RuntimeError(f"{mode}: a process exited with {[p.exitcode for p in processes]}")
    timings = sorted(results.get() for _ in processes)
    return {
        "mode": mode,
        "batch_per_process": cfg.data.loader.batch_size,
        "ms_per_step": [round(1000 * seconds / steps, 1) for _, seconds, _ in timings],
        "images_per_s": round(sum(images / seconds for _, seconds, images in timings), 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=40, help="Timed steps per process (after 3 warm-up steps).")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    configure_logging()
    cfg = load_or_exit(TrainJobConfig, args.config, args.set, DEFAULT_CONFIG)
    try:
        cfg = resolve_data(cfg.with_absolute_paths())
    except (FileNotFoundError, ValueError) as error:
        fail(str(error))
    records = {mode: measure(cfg, mode, args.steps) for mode in MODES}
    for record in records.values():
        logger.info(json.dumps(record))
    ratio = records["ddp"]["images_per_s"] / records["independent"]["images_per_s"]
    logger.info(json.dumps({"ddp_over_independent": round(ratio, 2)}))


if __name__ == "__main__":
    main()
