"""The 'window' train order (`LoaderConfig.shuffle`): still-encoded rows permuted inside consecutive windows.

Memory per window and its cap are described in docs/data.md ("Shuffling"); figures in docs/benchmarks.md.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import Dataset
from ray.data.expressions import random as random_column

from sd_detr.data.meta import load_meta

logger = logging.getLogger(__name__)

SHUFFLE_KEY_COLUMN = "shuffle_key"
WINDOW_SHUFFLE_CONCURRENCY = 2  # shuffle tasks at a time per dataset execution (bounds their memory)


def _data_object_store_budget() -> float | None:
    """Bytes of object store Ray Data may use on this cluster (its default: half the store), None without Ray."""
    if not ray.is_initialized():
        return None
    total = ray.cluster_resources().get("object_store_memory")
    fraction = ray.data.DataContext.get_current().override_object_store_memory_limit_fraction or 0.5
    return None if not total else float(total) * fraction


def shuffle_window_rows(dataset_dir: Path | str, window_mb: float) -> int:
    """Rows per 'window' shuffle window: `window_mb` of encoded rows at the directory's mean shard bytes per row.

    Capped at a quarter of Ray Data's object-store budget (with a warning): a window is gathered in the object
    store before it is shuffled, and one larger than the budget stalls the pipeline (docs/benchmarks.md,
    "Data throughput").
    """
    dataset_dir = Path(dataset_dir).resolve()
    meta = load_meta(dataset_dir)
    total_bytes = sum(path.stat().st_size for path in meta.shard_paths(dataset_dir))
    window_bytes = window_mb * 2**20
    budget = _data_object_store_budget()
    if budget is not None and window_bytes > budget / 4:
        logger.warning(
            "shuffle_window_mb=%g exceeds a quarter of Ray Data's object-store budget (%.0f MB): using %.0f MB",
            window_mb, budget / 2**20, budget / 4 / 2**20,
        )  # fmt: skip
        window_bytes = budget / 4
    return max(1, int(window_bytes / max(total_bytes / max(meta.counts.images, 1), 1.0)))


def _permute_window(table: pa.Table) -> pa.Table:
    """`map_batches` function: one window of still-encoded rows, ordered by their random shuffle key."""
    order = pc.sort_indices(table, sort_keys=[(SHUFFLE_KEY_COLUMN, "ascending")])
    return table.take(order).drop_columns([SHUFFLE_KEY_COLUMN])


def window_shuffle(dataset: Dataset, window_rows: int, seed: int | None) -> Dataset:
    """Permute the rows of `dataset` inside consecutive windows of `window_rows` rows, differently every epoch.

    Each row gets a uniform random key (Ray's seeded `random()` expression with `reseed_after_execution=True`:
    new keys at every execution, i.e. every epoch, the same keys for a rerun with the same seed), and each
    window is sorted by it, before decoding, on the encoded bytes: the window costs ~its share of the shard
    bytes, not decoded images. At most `WINDOW_SHUFFLE_CONCURRENCY` windows are shuffled at a time. Row count
    and content are unchanged (so `streaming_split(equal=True)` and the per-row augmentation seed are too).
    """
    key_seed = None if seed is None else int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
    dataset = dataset.with_column(SHUFFLE_KEY_COLUMN, random_column(seed=key_seed, reseed_after_execution=True))
    return dataset.map_batches(
        _permute_window,
        batch_size=window_rows,
        batch_format="pyarrow",
        num_cpus=0.25,
        compute=ray.data.TaskPoolStrategy(size=WINDOW_SHUFFLE_CONCURRENCY),
        udf_modifying_row_count=False,
    )
