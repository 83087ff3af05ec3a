"""What a Ray Train worker needs around DDP: collectives every rank takes part in, and per-rank seeding.

Nothing here imports Ray; with no process group initialized every function acts as on a single process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from sd_detr.config import ModelConfig
from sd_detr.data.collate import DetectionBatch
from sd_detr.engine import compile_transformer
from sd_detr.model import Detector, build_detector

T = TypeVar("T")


def distributed() -> bool:
    """True inside an initialized process group (a DDP worker)."""
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of ranks); (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def mean_over_workers(count: torch.Tensor) -> torch.Tensor:
    """Number-of-boxes normalizer for DDP: the mean of ``count`` over all ranks."""
    if not distributed():
        return count
    count = count.clone()
    dist.all_reduce(count)
    return count / dist.get_world_size()


def sum_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value summed over all ranks (float64; every rank must pass the same keys)."""
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def gather_to_rank0(payload: T) -> list[T] | None:
    """Every rank's picklable ``payload``, in rank order, on rank 0 (None on the other ranks).

    A collective: every rank must call it, also a rank with nothing to send (pass an empty payload).
    """
    if not distributed():
        return [payload]
    rank, world = rank_and_world()
    # with nccl, gather_object stages the pickles on torch.cuda.current_device(): Ray Train's torch backend
    # has set it to this worker's GPU
    received: list[T] | None = [None] * world if rank == 0 else None  # type: ignore[list-item]
    dist.gather_object(payload, received, dst=0)
    return received


def all_gather(value: T) -> list[T]:
    """Every rank's small picklable ``value``, in rank order, on every rank (a collective)."""
    if not distributed():
        return [value]
    values: list[T] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(values, value)
    return values


_host_groups: dict[int, dist.ProcessGroup] = {}


def _host_group() -> dist.ProcessGroup | None:
    """A process group whose collectives run on the host: None (the default group) when that is gloo, else a
    gloo group over the same ranks, made once per default group (a collective: every rank calls it first
    at the same point, the first :func:`synchronized_batches`)."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _host_groups:
        _host_groups[key] = dist.new_group(backend="gloo")
    return _host_groups[key]


def _count_over_ranks(flags: list[bool]) -> list[int]:
    """For each flag, how many ranks raised it: a sum on the host (gloo), so it never waits for a GPU."""
    counts = torch.tensor(flags, dtype=torch.int64)
    dist.all_reduce(counts, group=_host_group())
    return counts.tolist()


def synchronized_batches(
    batches: Iterable[DetectionBatch], on_skip: Callable[[DetectionBatch], None] | None = None
) -> Iterator[DetectionBatch]:
    """Yield batches only while every rank has one, so all ranks run the same number of DDP steps.

    A step where some rank's batch is empty (all its images corrupt) is skipped by all ranks; once one rank
    runs out, the others drain their iterators without training. Each batch of this rank that is not yielded
    goes to ``on_skip`` (so its corrupt rows can still be counted). The ranks agree through one CPU
    collective per batch (gloo), so a CUDA step never waits here for the device (with NCCL a device tensor
    would).
    """
    iterator, exhausted = iter(batches), False
    world = dist.get_world_size() if distributed() else 1
    while True:
        batch = None if exhausted else next(iterator, None)
        exhausted = batch is None
        flags = [exhausted, batch is not None and not len(batch)]
        ranks_exhausted, ranks_empty = _count_over_ranks(flags) if world > 1 else [int(f) for f in flags]
        if ranks_exhausted == world:
            return
        if ranks_exhausted == 0 and ranks_empty == 0:
            yield batch
        elif batch is not None and on_skip is not None:
            on_skip(batch)


def worker_seed(seed: int, rank: int, epoch: int = 0) -> int:
    """A 63-bit seed of the random draws of ``rank`` in ``epoch`` (dropout, any torch RNG use in the loop).

    Hashed from (seed, rank, epoch) with NumPy's SeedSequence, so no two ranks or epochs of one run share a
    stream, and neighbouring seeds do not collide either (``seed + rank`` would make seed 1 rank 0 replay
    seed 0 rank 1).
    """
    if rank < 0 or epoch < 0:
        raise ValueError(f"rank and epoch must be >= 0, got rank={rank}, epoch={epoch}")
    sequence = np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, rank, epoch])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] & 0x7FFFFFFFFFFFFFFF)


def seed_worker(seed: int, rank: int, epoch: int = 0) -> int:
    """Seed torch's CPU and CUDA generators with :func:`worker_seed`; returns that seed.

    Called at the start of every epoch, so a run resumed at epoch k draws what an uninterrupted run draws.
    """
    derived = worker_seed(seed, rank, epoch)
    torch.manual_seed(derived)
    return derived


def build_worker_detector(config: ModelConfig, seed: int, rank: int, compile: bool = False) -> Detector:
    """The detector of ``rank``: weights initialised from the shared ``seed`` (the same on every rank, as DDP
    requires), then torch's generators re-seeded per rank (:func:`seed_worker`, epoch 0) for what follows.
    ``compile`` (``training.compile``): its transformer compiled in place (:func:`sd_detr.engine.compile_transformer`)."""
    detector = build_detector(config, seed=seed)
    if compile:
        compile_transformer(detector)  # in place: DDP, checkpoints and evaluation see the same module tree
    seed_worker(seed, rank)
    return detector
