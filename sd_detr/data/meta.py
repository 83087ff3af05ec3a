"""Dataset metadata (`_meta.json`) and the one category-id <-> label map of the project.

A shard directory is complete exactly when its `_meta.json` exists: the converter writes that file last
and moves the directory into place atomically. The model uses contiguous labels `0..C-1`, the index of a
category in the categories sorted by id; COCO evaluation and predictions use the original category ids.
Every conversion between the two goes through `DatasetMeta`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

META_FILENAME = "_meta.json"
VALIDATION_FILENAME = "_validation.json"
SCHEMA_VERSION = 1


class MetaNotFoundError(FileNotFoundError):
    """Raised when a dataset directory has no `_meta.json` (not converted, or conversion incomplete)."""


class Category(BaseModel):
    """One COCO category."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(description="Original COCO category id (may be non-contiguous).")
    name: str = Field(description="Category name.")
    supercategory: str = Field(default="", description="COCO supercategory ('' when absent).")


class DatasetCounts(BaseModel):
    """What a shard directory holds."""

    model_config = ConfigDict(extra="forbid")

    images: int = Field(ge=0, description="Rows (images) written to the shards.")
    annotations: int = Field(ge=0, description="Annotations written, crowd annotations included.")
    crowd_annotations: int = Field(default=0, ge=0, description="Annotations with iscrowd=1 (kept).")
    shards: int = Field(ge=0, description="Number of Parquet shard files.")


class DatasetMeta(BaseModel):
    """Content of `_meta.json` beside the Parquet shards, plus the category-id <-> label map."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(default=SCHEMA_VERSION, description="Shard schema version.")
    categories: list[Category] = Field(description="Categories, sorted by id (label = index here).")
    counts: DatasetCounts = Field(description="Images, annotations and shards written.")
    shards: list[str] = Field(description="Shard file names, relative to the dataset directory.")
    annotation_file: str = Field(
        description="COCO annotation json the shards came from; relative paths are relative to the "
        "dataset directory (see `annotation_path`). The val split's file is the COCO ground truth."
    )
    image_root: str = Field(description="Image folder of the source dataset (same path convention).")
    source: Literal["coco", "synthetic"] = Field(default="coco", description="Which converter made it.")
    split: str | None = Field(default=None, description="Split name, e.g. 'train' or 'val'.")
    generator_config: dict[str, Any] | None = Field(
        default=None, description="Synthetic generator settings (None for converted COCO data)."
    )

    @model_validator(mode="after")
    def _check_categories(self) -> DatasetMeta:
        ids = [c.id for c in self.categories]
        if ids != sorted(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"categories must be sorted by id without duplicates, got ids {ids}")
        return self

    @property
    def num_classes(self) -> int:
        """Number of contiguous labels C (labels are 0..C-1)."""
        return len(self.categories)

    @property
    def category_ids(self) -> np.ndarray:
        """int64 [C]: the category id of each label."""
        return np.asarray([c.id for c in self.categories], dtype=np.int64)

    @property
    def category_names(self) -> list[str]:
        """Category name of each label."""
        return [c.name for c in self.categories]

    def category_id_to_label(self, category_ids: Any) -> Any:
        """Map COCO category ids to contiguous labels.

        Args:
            category_ids: an int, a numpy array or a torch tensor of category ids (any shape).
        Returns:
            the same kind of object (int64 for arrays/tensors) holding labels in [0, C).
        Raises:
            KeyError: when an id is not one of the dataset's categories.
        """
        return _lookup(self.category_ids, category_ids)

    def label_to_category_id(self, labels: Any) -> Any:
        """Map contiguous labels in [0, C) back to COCO category ids (int, numpy or torch, any shape)."""
        table = self.category_ids
        if isinstance(labels, torch.Tensor):
            if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(table)):
                raise KeyError(f"labels must lie in [0, {len(table)}), got {labels.unique().tolist()}")
            return torch.as_tensor(table, device=labels.device)[labels.long()]
        array = np.asarray(labels)
        if array.size and (array.min() < 0 or array.max() >= len(table)):
            raise KeyError(f"labels must lie in [0, {len(table)}), got {np.unique(array).tolist()}")
        out = table[array.astype(np.int64)]
        return int(out) if np.ndim(labels) == 0 and not isinstance(labels, np.ndarray) else out

    def resolve(self, dataset_dir: Path, relative_or_absolute: str) -> Path:
        """Resolve a path stored in this meta (relative paths are relative to `dataset_dir`)."""
        path = Path(relative_or_absolute)
        return path if path.is_absolute() else (Path(dataset_dir) / path).resolve()

    def annotation_path(self, dataset_dir: Path) -> Path:
        """Absolute path of the COCO annotation json (COCO ground truth for evaluation)."""
        return self.resolve(dataset_dir, self.annotation_file)

    def shard_paths(self, dataset_dir: Path) -> list[Path]:
        """Absolute paths of the shard files, in write order."""
        return [Path(dataset_dir).resolve() / name for name in self.shards]


def _lookup(table: np.ndarray, category_ids: Any) -> Any:
    is_tensor = isinstance(category_ids, torch.Tensor)
    values = category_ids.detach().cpu().numpy() if is_tensor else np.asarray(category_ids)
    values = values.astype(np.int64)
    positions = np.searchsorted(table, values).clip(max=max(len(table) - 1, 0))
    found = table[positions] == values if len(table) else np.zeros(values.shape, dtype=bool)
    if not np.all(found):
        raise KeyError(f"unknown category ids {np.unique(values[~found]).tolist()}; known: {table.tolist()}")
    if is_tensor:
        return torch.as_tensor(positions, dtype=torch.int64, device=category_ids.device)
    if isinstance(category_ids, np.ndarray):
        return positions.astype(np.int64)
    return int(positions) if positions.ndim == 0 else positions.astype(np.int64)


def load_meta(dataset_dir: Path | str) -> DatasetMeta:
    """Read `<dataset_dir>/_meta.json`.

    Raises:
        MetaNotFoundError: the directory was never converted or its conversion did not finish.
    """
    path = Path(dataset_dir) / META_FILENAME
    if not path.is_file():
        raise MetaNotFoundError(
            f"{path} not found: {dataset_dir} is not a complete shard directory. Run "
            "`python pipelines/prepare_data.py coco --annotations A.json --images DIR --out "
            f"{dataset_dir}` (or `python pipelines/prepare_data.py synthetic --out DIR`) first."
        )
    return DatasetMeta.model_validate_json(path.read_text())


def write_json_atomic(path: Path, payload: dict[str, Any] | str) -> None:
    """Write a json file via a temporary file + rename, so readers never see half a file."""
    text = payload if isinstance(payload, str) else json.dumps(payload, indent=2, sort_keys=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text + ("\n" if not text.endswith("\n") else ""))
    os.replace(tmp, path)


def write_meta(dataset_dir: Path, meta: DatasetMeta) -> Path:
    """Write `_meta.json` (call this last: its presence marks the directory complete)."""
    path = Path(dataset_dir) / META_FILENAME
    write_json_atomic(path, meta.model_dump_json(indent=2))
    return path
