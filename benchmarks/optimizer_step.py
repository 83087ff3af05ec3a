"""Milliseconds per AdamW step over the default detector's parameters: the per-parameter loop, `foreach` and
`fused` (what `sd_detr.engine.build_optimizer` uses), measured in one process on random gradients.

    python benchmarks/optimizer_step.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from pipelines.cli import configure_logging
from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from sd_detr.config import load_config
from sd_detr.model import build_detector

logger = logging.getLogger("benchmarks.optimizer_step")
VARIANTS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def step_ms(model: torch.nn.Module, options: dict[str, bool], repeats: int) -> float:
    """Median milliseconds of one AdamW step (after 3 warm-up steps) with the given implementation options."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4, **options)
    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        optimizer.step()
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray Train worker has 1 here)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    configure_logging()
    torch.set_num_threads(args.threads)
    model = build_detector(load_config(TrainJobConfig, DEFAULT_CONFIG).model, seed=0)
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter)
    count = sum(parameter.numel() for parameter in model.parameters())
    results = {name: step_ms(model, options, args.repeats) for name, options in VARIANTS.items()}
    logger.info("AdamW step over %.2fM parameters, %d thread(s), median of %d", count / 1e6, args.threads, args.repeats)
    for name, ms in results.items():
        logger.info("%-8s %7.1f ms   ratio loop/this %.2f", name, ms, results["loop"] / ms)


if __name__ == "__main__":
    main()
