"""Writes `_ground_truth.json`: the cleaned COCO ground truth of exactly the rows written to the shards.

Streaming: image and annotation records go to two part files as the shards are written, and `finish`
joins them into one COCO json, so memory does not grow with the dataset. Read it back with
`sd_detr.data.meta.load_ground_truth`.

Content: `info` (the source's, plus an `sd_detr` entry naming the source json), `licenses` (the source's),
`categories` (as in `_meta.json`: id, name, supercategory, sorted by id), `images` (the kept image records
as the source gave them), `annotations` (kept annotations only, crowd included: `id` >= 1 and unique,
`image_id`, `category_id`, `bbox` xywh px exactly as in the shards (clipped where the converter clipped),
`area`, `iscrowd`). Segmentations are not kept: evaluation is bbox-only.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sd_detr.data.meta import GROUND_TRUTH_FILENAME, SCHEMA_VERSION, Category


def _dumps(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"), allow_nan=False)


class GroundTruthWriter:
    """Accumulates kept images and annotations on disk; `finish()` writes `<directory>/_ground_truth.json`."""

    def __init__(
        self,
        directory: Path,
        categories: Sequence[Category],
        *,
        source: str,
        info: dict[str, Any] | None = None,
        licenses: list[Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.path = self.directory / GROUND_TRUTH_FILENAME
        self._header = {
            "info": {**(info or {}), "sd_detr": {"cleaned_from": source, "schema_version": SCHEMA_VERSION}},
            "licenses": licenses or [],
            "categories": [c.model_dump() for c in categories],
        }
        self._parts = {name: self.directory / f".{GROUND_TRUTH_FILENAME}.{name}.part" for name in ("images", "ann")}
        self._files = {name: path.open("w") for name, path in self._parts.items()}
        self.num_images = 0
        self.num_annotations = 0

    def add_image(self, record: dict[str, Any], annotations: Sequence[dict[str, Any]]) -> None:
        """One kept image record and its kept annotation records (already complete COCO dicts)."""
        self._files["images"].write(("," if self.num_images else "") + "\n" + _dumps(record))
        self.num_images += 1
        for annotation in annotations:
            self._files["ann"].write(("," if self.num_annotations else "") + "\n" + _dumps(annotation))
            self.num_annotations += 1

    def finish(self) -> Path:
        """Join the parts into `_ground_truth.json` (atomically: temp file + rename); returns its path."""
        self.close()
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with tmp.open("w") as out:
            header = json.dumps(self._header, separators=(",", ":"))
            out.write(header[:-1] + ',\n"images":[')
            with self._parts["images"].open() as part:
                shutil.copyfileobj(part, out)
            out.write('\n],\n"annotations":[')
            with self._parts["ann"].open() as part:
                shutil.copyfileobj(part, out)
            out.write("\n]}\n")
        os.replace(tmp, self.path)
        for part in self._parts.values():
            part.unlink(missing_ok=True)
        return self.path

    def close(self) -> None:
        """Close the part files (idempotent); `finish` calls it."""
        for handle in self._files.values():
            handle.close()
