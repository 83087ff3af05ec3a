"""Subsets of a shard directory's rows, selected by image id: the val shares of distributed evaluation.

`split_rows` cuts a directory into contiguous shares of file order; `build_datasets(val_shares=W)`
(`pipelines/ray_data.py`) reads each share as its own dataset, named by `val_share_name`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
from ray.data import Dataset
from ray.data.expressions import col

from sd_detr.data.meta import load_meta

VAL_SHARE_PREFIX = "val_rank"


def val_share_name(rank: int) -> str:
    """Name of the val dataset that Train worker ``rank`` evaluates (see `build_datasets`)."""
    return f"{VAL_SHARE_PREFIX}{rank}"


@dataclass(frozen=True)
class RowSelection:
    """A subset of a shard directory's rows: their image ids (in file order) and the shard files holding them.

    An empty selection still names one shard file (Ray cannot read zero files) and yields no rows.
    """

    shard_paths: tuple[str, ...]
    image_ids: tuple[int, ...]

    def apply(self, dataset: Dataset) -> Dataset:
        """``dataset`` (rows of ``shard_paths``) restricted to ``image_ids``, before any decoding."""
        if not self.image_ids:
            return dataset.limit(0)
        return dataset.filter(expr=col("image_id").is_in(list(self.image_ids)))


def split_rows(dataset_dir: Path | str, parts: int) -> list[RowSelection]:
    """A shard directory's rows in ``parts`` contiguous runs of file order, sizes differing by at most one.

    Every row lands in exactly one part (a part is empty when there are fewer rows than parts), the parts
    in order are the file order, and each part names only the files its rows are in. Only the ``image_id``
    column is read.

    Raises:
        ValueError: ``parts < 1``, or an image id occurs twice (rows are selected by image id).
    """
    if parts < 1:
        raise ValueError(f"cannot split rows into {parts} parts")
    dataset_dir = Path(dataset_dir).resolve()
    paths = [str(p) for p in load_meta(dataset_dir).shard_paths(dataset_dir)]
    located = [
        (path, int(image_id))
        for path in paths
        for image_id in pq.read_table(path, columns=["image_id"]).column("image_id").to_pylist()
    ]
    counts = Counter(image_id for _, image_id in located)
    if len(counts) != len(located):
        repeated = sorted(i for i, n in counts.items() if n > 1)[:5]
        raise ValueError(f"{dataset_dir}: image ids occur more than once in the shards, e.g. {repeated}")
    selections, start = [], 0
    for part in range(parts):
        stop = start + len(located) // parts + (part < len(located) % parts)
        chunk = located[start:stop]
        files = tuple(dict.fromkeys(path for path, _ in chunk)) or tuple(paths[:1])
        selections.append(RowSelection(files, tuple(image_id for _, image_id in chunk)))
        start = stop
    return selections
