"""Pydantic configs of the data code: augmentation, loading, COCO conversion, synthetic generation.

Each model is self-contained (no reference to a root config) so it can be nested anywhere. Defaults suit
the small built-in synthetic dataset (128-192 px images); `configs/coco_r50.yaml` holds the paper's
COCO recipe (shorter side 480..800, longer side <= 1333).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from sd_detr.config import StrictModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AugmentationConfig(StrictModel):
    """DETR's train augmentation and the eval resize (sizes in pixels of the decoded image).

    Train: horizontal flip, then either a multi-scale resize of the shorter side (longer side capped), or,
    with probability `crop_prob`, resize -> random crop -> multi-scale resize; then ImageNet normalization.
    Eval: resize of the shorter side to `eval_size` (longer side capped), normalization.
    """

    train_scales: list[int] = Field(
        default=[128, 144, 160, 176, 192],
        min_length=1,
        description="Shorter-side sizes (px) a train image is resized to, one picked at random.",
    )
    train_max_size: int = Field(default=320, gt=0, description="Longer-side cap (px) of train images.")
    flip_prob: float = Field(default=0.5, ge=0.0, le=1.0, description="Horizontal flip probability.")
    crop: bool = Field(default=True, description="Enable DETR's resize -> random crop -> resize branch.")
    crop_prob: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Probability of the crop branch when `crop` is on."
    )
    crop_pre_scales: list[int] = Field(
        default=[112, 128, 144],
        min_length=1,
        description="Shorter-side sizes (px) before cropping (DETR: 400, 500, 600).",
    )
    crop_min_size: int = Field(default=96, gt=0, description="Smallest crop side (px) (DETR: 384).")
    crop_max_size: int = Field(default=144, gt=0, description="Largest crop side (px) (DETR: 600).")
    min_box_size: float = Field(
        default=1.0,
        ge=1.0,
        description="Train boxes narrower or lower than this (px) after cropping are dropped. At least 1 px: "
        "torchvision's `SanitizeBoundingBoxes` rejects a smaller `min_size`.",
    )
    eval_size: int = Field(default=160, gt=0, description="Eval shorter side (px) (DETR: 800).")
    eval_max_size: int = Field(default=320, gt=0, description="Eval longer-side cap (px) (DETR: 1333).")
    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN, description="Normalization mean (RGB).")
    std: tuple[float, float, float] = Field(default=IMAGENET_STD, description="Normalization std (RGB).")

    @model_validator(mode="after")
    def _check_crop(self) -> AugmentationConfig:
        if self.crop_min_size > self.crop_max_size:
            raise ValueError(f"crop_min_size {self.crop_min_size} > crop_max_size {self.crop_max_size}")
        if any(s <= 0 for s in [*self.train_scales, *self.crop_pre_scales]):
            raise ValueError("train_scales and crop_pre_scales must be positive")
        if self.eval_max_size <= self.eval_size:
            raise ValueError(f"eval_max_size {self.eval_max_size} must exceed eval_size {self.eval_size}")
        return self


class LoaderConfig(StrictModel):
    """How shards are streamed into training/evaluation batches (Ray Data path and DataLoader path)."""

    batch_size: int = Field(default=4, gt=0, description="Images per batch, per training worker.")
    shuffle: Literal["none", "files", "window", "rows"] = Field(
        default="rows",
        description="Train order per epoch (Ray path; docs/data.md 'Shuffling'): 'window' (for COCO) shuffles "
        "shard order, then the still-encoded rows inside consecutive windows of `shuffle_window_mb`, reseeded "
        "every epoch; 'rows' is a global shuffle of all rows (an all-to-all exchange of every image's bytes "
        "each epoch: fine for small data); 'files' shuffles shard order only (image order inside a shard "
        "never changes); 'none' keeps shard order.",
    )
    shuffle_window_mb: float = Field(
        default=256.0,
        gt=0.0,
        description="'window' shuffle: MB of encoded rows (shard bytes) permuted together (COCO: ~1,600 "
        "images). Memory per training job, not per worker: at most 2 shuffle tasks at a time, each holding "
        "about 2x this in its heap and 2x in the object store. Capped at a quarter of Ray Data's object-store "
        "budget (a larger window would stall the pipeline).",
    )
    seed: int | None = Field(
        default=0,
        description="Seed of shuffling and augmentation; epochs still differ. None = not reproducible.",
    )
    decode_batch_size: int = Field(default=16, gt=0, description="Rows per Ray Data decode+transform task batch.")
    decode_num_cpus: float = Field(default=1.0, gt=0.0, description="Logical CPUs each Ray Data decode task reserves.")
    prefetch_batches: int = Field(default=2, ge=0, description="Batches fetched ahead by the iterator.")
    preserve_order: bool = Field(
        default=True,
        description="Ray Data keeps row order (needed for bit-identical runs; slightly slower).",
    )
    drop_last: bool = Field(
        default=False,
        description="Drop the last incomplete batch of each training epoch. Training only: evaluation always "
        "batches every image (COCO AP would otherwise score a subset).",
    )
    materialize_val: bool = Field(
        default=True,
        description="Ray path: decode + transform the val set once, at job start, and keep it in Ray's object "
        "store (uint8 at the eval size: ~3 MB per 800 px COCO image). Each evaluation then only reads it; "
        "streaming it anew every epoch also delays the next epoch's first train batch by seconds. "
        "False: stream it every evaluation (val sets larger than the object store).",
    )


class ConvertConfig(StrictModel):
    """COCO instances json + image folder -> Parquet shards (`pipelines/prepare_data.py coco`)."""

    annotations: Path = Field(description="COCO instances json (e.g. annotations/instances_train2017.json).")
    images: Path = Field(description="Folder the json's `file_name`s are relative to.")
    out: Path = Field(
        description="Output shard directory (created with its parents; must be empty or absent unless `overwrite`)."
    )
    shard_size_mb: float = Field(default=256.0, gt=0.0, description="Target shard size (MB of row data).")
    row_group_rows: int = Field(default=64, gt=0, description="Rows per Parquet row group.")
    strict: bool = Field(default=False, description="Fail (no dataset written) on any repaired/skipped record.")
    overwrite: bool = Field(default=False, description="Replace an existing shard directory.")
    verify_images: bool = Field(default=True, description="Decode every image to detect corrupt files.")
    num_threads: int = Field(default=4, gt=0, description="Threads reading and verifying images.")
    min_kept_fraction: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Fail (nothing written) when fewer than this share of the json's image records are kept, "
        "e.g. a wrong image folder. A conversion that keeps no image always fails.",
    )
    split: str | None = Field(default=None, description="Split name recorded in `_meta.json`.")
    progress: bool = Field(default=True, description="Show a progress bar.")

    @field_validator("annotations")
    @classmethod
    def _annotations_exist(cls, path: Path) -> Path:
        if not path.is_file():
            raise ValueError(f"annotation file {path} does not exist")
        return path

    @field_validator("images")
    @classmethod
    def _images_exist(cls, path: Path) -> Path:
        if not path.is_dir():
            raise ValueError(f"image folder {path} does not exist")
        return path

    @field_validator("out")
    @classmethod
    def _out_can_be_a_directory(cls, path: Path) -> Path:
        if path.exists() and not path.is_dir():
            raise ValueError(f"--out {path} exists and is not a directory")
        for ancestor in path.resolve().parents:  # missing parents are created by the conversion
            if ancestor.exists():
                if not ancestor.is_dir():
                    raise ValueError(f"--out {path}: {ancestor} is a file, not a folder")
                break
        return path


class SyntheticConfig(StrictModel):
    """The built-in synthetic COCO-format dataset (shapes on textured backgrounds)."""

    seed: int = Field(default=0, description="Generator seed; the same seed gives identical bytes.")
    num_train: int = Field(default=400, ge=1, description="Train images.")
    num_val: int = Field(default=100, ge=1, description="Val images.")
    min_image_size: int = Field(default=128, ge=64, description="Smallest image side (px).")
    max_image_size: int = Field(default=192, ge=64, description="Largest image side (px).")
    max_objects: int = Field(default=6, ge=1, description="Most annotated objects in one image.")
    empty_fraction: float = Field(default=0.06, ge=0.0, le=1.0, description="Share of images without objects.")
    min_object_size: int = Field(default=14, ge=4, description="Smallest object extent (px).")
    max_object_size: int = Field(default=72, ge=8, description="Largest object extent (px).")
    max_occlusion: float = Field(
        default=0.4, ge=0.0, lt=1.0, description="Largest share of an object that later ones may cover."
    )
    num_distractors: tuple[int, int] = Field(
        default=(2, 8), description="Range (inclusive) of unannotated clutter items per image."
    )
    shard_size_mb: float = Field(default=4.0, gt=0.0, description="Shard size of the converted splits.")

    @model_validator(mode="after")
    def _check_ranges(self) -> SyntheticConfig:
        if self.min_image_size > self.max_image_size:
            raise ValueError("min_image_size must be <= max_image_size")
        if self.min_object_size > self.max_object_size:
            raise ValueError("min_object_size must be <= max_object_size")
        if self.max_object_size > self.min_image_size:
            raise ValueError("max_object_size must be <= min_image_size")
        low, high = self.num_distractors
        if not 0 <= low <= high:
            raise ValueError(f"num_distractors must be a range 0 <= low <= high, got {self.num_distractors}")
        return self
