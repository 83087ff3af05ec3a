"""Host-device synchronisations per training step of the worker loop, counted at the dispatcher.

Runs ``pipelines.worker.train_one_epoch`` (the Ray Train worker's loop body, single process: no Ray cluster is
started) for ``--steps`` steps of the job config's model on random padded batches, after one warm-up step,
and lists by call site every op or call that makes the host wait for the device on CUDA:

- ``aten._local_scalar_dense``: a scalar read (``.item()``, ``float(t)``, ``int(t)``, ``if t:``);
- ``aten.nonzero``, ``aten.masked_select``, ``aten._unique2``, ``aten.repeat_interleave`` ... and indexing
  with a boolean mask (``aten.index``/``aten.index_put`` with a bool index, also in backward): an output
  whose shape depends on the values;
- ``Tensor.cpu`` / ``Tensor.tolist``: a device-to-host copy (counted at the Python call: on CPU it is no op).

The ops are the same on CPU and CUDA, so a CPU run shows where the CUDA syncs are. Not counted: reads of
tensors that live on the host in a CUDA run too (the optimizer's step counters; on CUDA any read of a CPU
tensor). What a CPU run cannot see is a blocking host-to-device copy (``torch.tensor(data, device=cuda)``,
``.to(cuda)`` of a host tensor without ``non_blocking``): on CUDA the script also counts the calls that
``torch.cuda.set_sync_debug_mode("warn")`` reports, which include those.

    python benchmarks/step_syncs.py [--steps 10] [--device cpu|cuda] [--config FILE ...] [--set a.b=c ...]
"""

from __future__ import annotations

import argparse
import logging
import re
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pipelines.config import DEFAULT_CONFIG, TrainJobConfig
from pipelines.worker import train_one_epoch
from sd_detr.config import load_config
from sd_detr.data.collate import DetectionBatch
from sd_detr.engine import build_criterion, build_optimizer
from sd_detr.model import build_detector

aten = torch.ops.aten
DATA_DEPENDENT = frozenset({
    aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.repeat_interleave.Tensor,
})  # fmt: skip
INDEXING = frozenset({aten.index.Tensor, aten.index_put.default, aten.index_put_.default})
HOST_COPIES = frozenset({"tolist", "cpu"})
SITE = re.compile(r"\b((?:sd_detr|pipelines)/[\w/]+\.py)\((\d+)\): (\w+)")
HOST_COUNTERS = re.compile(r"torch/optim/optimizer\.py\(\d+\): _get_value")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", type=Path, help="job config files (default: the default job)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override, e.g. model.num_queries=50"
    )
    parser.add_argument("--steps", type=int, default=10, help="profiled training steps (after one warm-up step)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--image-size", type=int, default=128, help="largest image side; every other image is narrower")
    parser.add_argument("--objects", type=int, default=3, help="ground-truth boxes per image")
    return parser.parse_args(argv)


def random_batch(batch_size: int, size: int, objects: int, num_classes: int, seed: int) -> DetectionBatch:
    """``batch_size`` random images, odd ones 16 px narrower (so the batch is padded), ``objects`` boxes each."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(batch_size, 3, size, size)
    padding_mask = torch.ones(batch_size, size, size, dtype=torch.bool)
    targets, image_sizes = [], []
    for index in range(batch_size):
        width = size - 16 * (index % 2)
        image_sizes.append((size, width))  # what the collates record from the image shapes
        images[index, :, :, :width] = torch.randn(3, size, width, generator=generator)
        padding_mask[index, :, :width] = False
        centers = torch.rand(objects, 2, generator=generator) * 0.6 + 0.2
        sides = torch.rand(objects, 2, generator=generator) * 0.3 + 0.05
        targets.append({
            "boxes": torch.cat([centers, sides], dim=1),
            "labels": torch.randint(0, num_classes, (objects,), generator=generator),
            "image_id": torch.tensor(seed * batch_size + index),
            "orig_size": torch.tensor([size, width]),
            "size": torch.tensor([size, width]),
        })  # fmt: skip
    return DetectionBatch(images=images, padding_mask=padding_mask, targets=targets, image_sizes=image_sizes)


def python_frames() -> list[str]:
    """The Python call stack, innermost first, each as ``path(line): function``."""
    return [f"{f.filename}({f.lineno}): {f.name}" for f in reversed(traceback.extract_stack())]


def call_site(frames: list[str]) -> str:
    """The innermost frame of this repository's library code (``sd_detr/``, ``pipelines/``) among ``frames``
    as ``package/file.py:line function``; ``autograd (backward)`` when there is none."""
    for frame in frames:
        match = SITE.search(frame)
        if match:
            return f"{match.group(1)}:{match.group(2)} {match.group(3)}"
    return "autograd (backward)"


class SyncCounter(TorchDispatchMode):
    """Counts the ops that wait for the device, by (op, call site): :data:`DATA_DEPENDENT` ops and indexing
    with a boolean mask. Reads of host tensors (see the module docstring) are left out."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.calls: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        masks = func in INDEXING and any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        waits = func in DATA_DEPENDENT or masks
        on_host = self.device.type != "cpu" and all(t.device.type == "cpu" for t in tensors)
        if waits and not on_host:
            frames = python_frames()
            if not any(HOST_COUNTERS.search(frame) for frame in frames):
                self.calls[(func.overloadpacket.__name__, call_site(frames))] += 1
        return func(*args, **(kwargs or {}))


class HostCopyCounter(TorchFunctionMode):
    """Counts ``Tensor.tolist`` and ``Tensor.cpu`` calls on device tensors by call site."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.calls: Counter[tuple[str, str]] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_COPIES and args and args[0].device.type == self.device.type:
            self.calls[(f"Tensor.{name}", call_site(python_frames()))] += 1
        return func(*args, **(kwargs or {}))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = torch.device(args.device)
    cfg = load_config(TrainJobConfig, args.config or [DEFAULT_CONFIG], args.overrides)
    model = build_detector(cfg.model, seed=cfg.training.seed).to(device)
    criterion = build_criterion(cfg)
    optimizer = build_optimizer(model, cfg.optimizer)
    batch_size = cfg.data.loader.batch_size
    batches = [
        random_batch(batch_size, args.image_size, args.objects, cfg.model.num_classes, seed)
        for seed in range(args.steps + 1)
    ]

    def run(epoch_batches: list[DetectionBatch], epoch: int) -> None:
        train_one_epoch(
            model, criterion, optimizer, epoch_batches, cfg, device, epoch, None, None, 0, len(epoch_batches)
        )

    run(batches[:1], 0)  # warm-up: first-call allocations and lazy initialisation
    syncs, host_copies = SyncCounter(device), HostCopyCounter(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        with host_copies, syncs:
            run(batches[1:], 1)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    counts = syncs.calls + host_copies.calls
    steps = args.steps
    print(f"\n{cfg.model.variant} (taq {getattr(cfg.model, 'taq', '-')}), batch {batch_size}, {device}, {steps} steps")
    print(f"{'calls':>6}{'per step':>10}  {'op':<22}call site")
    for (op, site), count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{count:>6}{count / steps:>10.2f}  {op:<22}{site}")
    total = sum(counts.values())
    print(f"total: {total} calls = {total / steps:.2f} per step (per-epoch calls included, divided by {steps})")
    if device.type == "cuda":
        reported = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
        print(f"torch.cuda sync debug mode: {sum(reported.values()) / steps:.2f} synchronizing calls per step")
        for site, count in reported.most_common():
            print(f"{count:>6}  {site}")


if __name__ == "__main__":
    main()
