"""Dataset metadata (`_meta.json`), the cleaned COCO ground truth, and the one category-id <-> label map.

A shard directory is complete exactly when its `_meta.json` exists: the converter writes that file last
and moves the directory into place atomically. From schema version 2 on, the directory also holds
`_ground_truth.json`, the cleaned COCO annotations of exactly the images and annotations in the shards,
which is what evaluation reads (`load_ground_truth`); the source json and image folder are never needed
after conversion. The model uses contiguous labels `0..C-1`, the index of a category in the categories
sorted by id; COCO evaluation and predictions use the original category ids. Every conversion between the
two goes through `DatasetMeta`.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

META_FILENAME = "_meta.json"
VALIDATION_FILENAME = "_validation.json"
GROUND_TRUTH_FILENAME = "_ground_truth.json"
# 1: shards + _meta.json + _validation.json. 2: + _ground_truth.json (same Parquet schema).
SCHEMA_VERSION = 2
GROUND_TRUTH_SINCE_VERSION = 2


class MetaNotFoundError(FileNotFoundError):
    """Raised when a dataset directory has no `_meta.json` (not converted, or conversion incomplete)."""


class GroundTruthNotFoundError(FileNotFoundError):
    """A shard directory has no `_ground_truth.json` (converted before schema version 2, or damaged).

    The message holds the command that re-converts it from the source paths recorded in `_meta.json`.
    """


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
        description="Source COCO annotation json the shards came from (provenance only: it may not exist "
        "on the machine that reads the shards; evaluation reads `_ground_truth.json`, see "
        "`load_ground_truth`). Relative paths are relative to the dataset directory."
    )
    image_root: str = Field(description="Source image folder (provenance only; same path convention).")
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
        """Absolute path of the *source* COCO json (provenance; may be absent on this machine).

        Not the evaluation ground truth: use `load_ground_truth(dataset_dir)` for that.
        """
        return self.resolve(dataset_dir, self.annotation_file)

    def image_root_path(self, dataset_dir: Path) -> Path:
        """Absolute path of the source image folder (provenance; may be absent on this machine)."""
        return self.resolve(dataset_dir, self.image_root)

    def reconvert_command(self, dataset_dir: Path) -> str:
        """The shell command that rebuilds `dataset_dir` from its recorded source (json + image folder)."""
        dataset_dir = Path(dataset_dir).resolve()
        if self.source == "synthetic":
            settings = self.generator_config or {}
            flags = "".join(
                f" --{name.replace('_', '-')} {settings[name]}"
                for name in ("seed", "num_train", "num_val")
                if name in settings
            )
            return f"python pipelines/prepare_data.py synthetic --out {shlex.quote(str(dataset_dir.parent))}{flags} --overwrite"
        return (
            "python pipelines/prepare_data.py coco "
            f"--annotations {shlex.quote(str(self.annotation_path(dataset_dir)))} "
            f"--images {shlex.quote(str(self.image_root_path(dataset_dir)))} "
            f"--out {shlex.quote(str(dataset_dir))} --overwrite"
        )

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
    meta = DatasetMeta.model_validate_json(path.read_text())
    if meta.schema_version > SCHEMA_VERSION:
        raise ValueError(
            f"{path} has shard schema version {meta.schema_version}, newer than this code's {SCHEMA_VERSION}: "
            "update sd-detr, or re-convert the dataset with this version"
        )
    return meta


def ground_truth_path(dataset_dir: Path | str) -> Path:
    """Absolute path of `<dataset_dir>/_ground_truth.json` (whether or not it exists)."""
    return Path(dataset_dir).resolve() / GROUND_TRUTH_FILENAME


def load_ground_truth(dataset_dir: Path | str) -> dict[str, Any]:
    """The cleaned COCO ground truth of a shard directory, as a COCO dict.

    It holds exactly the images and annotations of the shards (`images`, `annotations` with `id` >= 1,
    `bbox` xywh px as in the shards, `area`, `iscrowd`, `category_id`; `categories` as in `_meta.json`),
    so `sd_detr.evaluation.coco_from_dict(load_ground_truth(d))` is a valid pycocotools ground truth.
    It never reads the source json or image folder.

    Raises:
        MetaNotFoundError: `dataset_dir` is not a complete shard directory.
        GroundTruthNotFoundError: the directory predates schema version 2 (or lost the file); the message
            holds the command that re-converts it.
        ValueError: the file does not match `_meta.json` (damaged or edited by hand).
    """
    dataset_dir = Path(dataset_dir).resolve()
    meta = load_meta(dataset_dir)
    path = ground_truth_path(dataset_dir)
    if meta.schema_version < GROUND_TRUTH_SINCE_VERSION or not path.is_file():
        why = (
            f"it was converted with shard schema version {meta.schema_version}, before the cleaned ground truth "
            "traveled with the shards"
            if meta.schema_version < GROUND_TRUTH_SINCE_VERSION
            else "the file is missing (the directory is damaged)"
        )
        raise GroundTruthNotFoundError(
            f"{path} not found: {why}. Evaluation reads only this file, never the source json. Re-convert "
            f"with: {meta.reconvert_command(dataset_dir)}"
        )
    with path.open() as handle:
        ground_truth = json.load(handle)
    images, annotations = ground_truth.get("images"), ground_truth.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise ValueError(f"{path} is not a COCO ground truth (needs 'images' and 'annotations' lists)")
    if (len(images), len(annotations)) != (meta.counts.images, meta.counts.annotations):
        raise ValueError(
            f"{path} holds {len(images)} images / {len(annotations)} annotations but _meta.json counts "
            f"{meta.counts.images} / {meta.counts.annotations}: the directory is damaged; re-convert with: "
            f"{meta.reconvert_command(dataset_dir)}"
        )
    return ground_truth


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
