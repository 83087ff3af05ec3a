"""`pipelines.ddp.synchronized_batches` on a real process group (gloo, 3 processes, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.ddp import synchronized_batches

# images per batch of each rank: rank 0 has an empty batch (all corrupt) at step 2, rank 1 runs out after 4
_BATCH_SIZES = [[2, 2, 0, 2, 2, 1], [2, 1, 2, 2], [2, 2, 2, 2, 2, 2, 2]]


class _Batch:
    def __init__(self, rank: int, step: int, size: int) -> None:
        self.key, self.size = (rank, step), size

    def __len__(self) -> int:
        return self.size


def _rank_loop(rank: int, world: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        consumed: list[int] = []

        def batches():
            for step, size in enumerate(_BATCH_SIZES[rank]):
                consumed.append(step)
                yield _Batch(rank, step, size)

        skipped: list[int] = []
        trained = [b.key[1] for b in synchronized_batches(batches(), on_skip=lambda b: skipped.append(b.key[1]))]
        result = {"trained": trained, "consumed": consumed, "skipped": skipped}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_train_the_same_steps_and_drain_their_iterators(tmp_path: Path) -> None:
    world = len(_BATCH_SIZES)
    mp.spawn(_rank_loop, args=(world, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(world)]
    # step 2 is skipped by all (rank 0's batch is empty); from step 4 on rank 1 has none, so nobody trains
    assert [r["trained"] for r in results] == [[0, 1, 3]] * world
    assert [r["consumed"] for r in results] == [list(range(len(sizes))) for sizes in _BATCH_SIZES]
    assert [r["skipped"] for r in results] == [[2, 4, 5], [2], [2, 4, 5, 6]]


def test_one_process_skips_empty_batches_and_hands_them_over() -> None:
    batches, skipped = [_Batch(0, step, size) for step, size in enumerate([2, 0, 1])], []
    assert [b.key[1] for b in synchronized_batches(batches, on_skip=lambda b: skipped.append(b.key[1]))] == [0, 2]
    assert skipped == [1]
