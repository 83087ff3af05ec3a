"""Parquet shard schema (docs/data.md, "Shard format") and a size-bounded shard writer / row-group reader.

One row per image: `image_id` int64, `file_name` string, `width`/`height` int32, `image` binary (the encoded
file bytes, never re-encoded), `boxes` flat list<float32> (4 per box, COCO xywh absolute px),
`category_ids` list<int32> (original COCO ids), `iscrowd` list<int8>, `area` list<float32>.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SHARD_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("file_name", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("boxes", pa.list_(pa.float32()), nullable=False),
        pa.field("category_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("iscrowd", pa.list_(pa.int8()), nullable=False),
        pa.field("area", pa.list_(pa.float32()), nullable=False),
    ]
)
SHARD_PATTERN = "part-{index:05d}.parquet"
# Image bytes are already compressed (JPEG/PNG); only the small annotation columns get zstd.
_COMPRESSION = {name: ("NONE" if name == "image" else "ZSTD") for name in SHARD_SCHEMA.names}


def _row_bytes(row: dict[str, Any]) -> int:
    """Approximate stored size of one row (bytes)."""
    return len(row["image"]) + len(row["file_name"]) + 13 * len(row["category_ids"]) + 32


class ShardWriter:
    """Writes rows into `part-NNNNN.parquet` files of at most ~`shard_size_bytes` each.

    Memory is bounded by one pending row group (`row_group_rows` rows). A shard is closed before the row
    that would push it past the size limit (a single larger row still gets a shard of its own).
    """

    def __init__(self, out_dir: Path, shard_size_bytes: int, row_group_rows: int = 64) -> None:
        self.out_dir = Path(out_dir)
        self.shard_size_bytes = shard_size_bytes
        self.row_group_rows = row_group_rows
        self.shard_files: list[str] = []
        self._writer: pq.ParquetWriter | None = None
        self._shard_bytes = 0
        self._pending: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        """Append one row (a dict with the `SHARD_SCHEMA` columns; list columns as sequences)."""
        size = _row_bytes(row)
        if self._writer is not None and self._shard_bytes + size > self.shard_size_bytes:
            self._close_shard()
        if self._writer is None:
            name = SHARD_PATTERN.format(index=len(self.shard_files))
            self._writer = pq.ParquetWriter(
                self.out_dir / name, SHARD_SCHEMA, compression=_COMPRESSION, use_dictionary=False
            )
            self.shard_files.append(name)
        self._pending.append(row)
        self._shard_bytes += size
        if len(self._pending) >= self.row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending and self._writer is not None:
            table = pa.Table.from_pylist(self._pending, schema=SHARD_SCHEMA)
            self._writer.write_table(table, row_group_size=len(self._pending))
            self._pending = []

    def _close_shard(self) -> None:
        self._flush()
        if self._writer is not None:
            self._writer.close()
        self._writer = None
        self._shard_bytes = 0

    def close(self) -> list[str]:
        """Flush and close; returns the shard file names written (in order)."""
        self._close_shard()
        return list(self.shard_files)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._close_shard()


def iter_row_groups(paths: Sequence[Path]) -> Iterator[tuple[Path, int]]:
    """Yield (shard path, row-group index) for every row group of the shards, in file order."""
    for path in paths:
        for index in range(pq.ParquetFile(path).num_row_groups):
            yield Path(path), index


def read_row_group(path: Path, index: int, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows of one row group as dicts (lists for list columns, bytes for `image`)."""
    return pq.ParquetFile(path).read_row_group(index, columns=columns).to_pylist()
