"""COCO instances json + image folder -> Parquet shards, with a validation report.

Streaming: the json is loaded once (annotation records only; segmentations are dropped as soon as they are
indexed), images are read and verified by a few threads through a bounded window, rows are written a row
group at a time. Atomic: everything goes to a hidden temporary directory beside `out`, `_meta.json` is
written last and the directory is renamed into place, so an interrupted run leaves no directory that
looks complete. See `sd_detr.data.validation` for what is repaired, skipped or flagged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sd_detr.data.config import ConvertConfig
from sd_detr.data.meta import (
    META_FILENAME,
    VALIDATION_FILENAME,
    Category,
    DatasetCounts,
    DatasetMeta,
    write_json_atomic,
    write_meta,
)
from sd_detr.data.samples import CorruptImageError, decode_image
from sd_detr.data.shards import ShardWriter
from sd_detr.data.validation import Issue, ValidationReport

logger = logging.getLogger(__name__)

_CLIP_TOLERANCE_PX = 1e-3


class DatasetExistsError(FileExistsError):
    """The output directory already holds data and `overwrite` is off."""


class CocoFormatError(ValueError):
    """The annotation file is not a COCO instances json (wrong top-level structure or categories)."""


class StrictValidationError(RuntimeError):
    """A `strict` conversion met at least one problem; nothing was written. `.report` has the details."""

    def __init__(self, report: ValidationReport, report_path: Path) -> None:
        super().__init__(f"{report.num_problems} problem(s) in strict mode; report: {report_path}")
        self.report = report
        self.report_path = report_path


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion produced."""

    out_dir: Path
    meta: DatasetMeta
    report: ValidationReport


@dataclass
class _Annotation:
    box: tuple[float, float, float, float]
    category_id: int
    iscrowd: int
    area: float


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stored_path(path: Path, out_dir: Path) -> str:
    """Relative to `out_dir` when `path` lies in the same dataset tree (out's parent), else absolute."""
    path, out_dir = path.resolve(), out_dir.resolve()
    if path.is_relative_to(out_dir.parent):
        return os.path.relpath(path, out_dir)
    return str(path)


def _load_coco(path: Path) -> dict[str, Any]:
    try:
        with path.open() as handle:
            coco = json.load(handle)
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path} is not valid json: {error}") from error
    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
        raise CocoFormatError(f"{path} is not a COCO instances json (needs 'images' and 'categories' lists)")
    if not isinstance(coco.get("annotations", []), list):
        raise CocoFormatError(f"{path}: 'annotations' must be a list")
    return coco


def _parse_categories(records: list[dict[str, Any]]) -> list[Category]:
    try:
        categories = [
            Category(id=int(c["id"]), name=str(c["name"]), supercategory=str(c.get("supercategory") or ""))
            for c in records
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise CocoFormatError(f"invalid category record: {error}") from error
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids):
        raise CocoFormatError(f"duplicate category ids in the annotation file: {sorted(ids)}")
    return sorted(categories, key=lambda c: c.id)


def _valid_images(records: list[dict[str, Any]], report: ValidationReport) -> list[dict[str, Any]]:
    """Image records with a usable id, file name and size; duplicates after the first are skipped."""
    seen: set[int] = set()
    images = []
    for record in records:
        image_id = record.get("id") if isinstance(record, dict) else None
        ok = (
            _is_int(image_id)
            and isinstance(record.get("file_name"), str)
            and record["file_name"] != ""
            and _is_int(record.get("width"))
            and _is_int(record.get("height"))
            and record["width"] > 0
            and record["height"] > 0
        )
        if not ok:
            report.add(Issue.INVALID_IMAGE_RECORD, image_id)
        elif image_id in seen:
            report.add(Issue.DUPLICATE_IMAGE_ID, image_id)
        else:
            seen.add(image_id)
            images.append(record)
    return images


def _clean_annotation(record: dict[str, Any], size: tuple[int, int], report: ValidationReport) -> _Annotation | None:
    """Validate and clip one annotation whose image and category are known. `size` = (width, height)."""
    ann_id = record.get("id")
    x, y, w, h = (float(v) for v in record["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        report.add(Issue.BOX_NON_POSITIVE_SIZE, ann_id)
        return None
    width, height = size
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        report.add(Issue.BOX_OUTSIDE_IMAGE, ann_id)
        return None
    box = (x, y, w, h)  # within float noise of the image: the original numbers are kept exactly
    if max(abs(x0 - x), abs(y0 - y), abs(x1 - x - w), abs(y1 - y - h)) > _CLIP_TOLERANCE_PX:
        report.add(Issue.BOX_CLIPPED, ann_id)
        box = (x0, y0, x1 - x0, y1 - y0)
    iscrowd = 1 if record.get("iscrowd") else 0
    if iscrowd:
        report.add(Issue.CROWD_ANNOTATION, ann_id)
    area = record.get("area")
    valid_area = isinstance(area, int | float) and not isinstance(area, bool) and math.isfinite(area) and area > 0
    return _Annotation(box, int(record["category_id"]), iscrowd, float(area) if valid_area else box[2] * box[3])


def _index_annotations(
    records: list[dict[str, Any]],
    images: dict[int, dict[str, Any]],
    category_ids: set[int],
    report: ValidationReport,
) -> dict[int, list[_Annotation]]:
    by_image: dict[int, list[_Annotation]] = {}
    for record in records:
        if not isinstance(record, dict):
            report.add(Issue.INVALID_ANNOTATION_RECORD, None)
            continue
        bbox = record.get("bbox")
        if not (
            _is_int(record.get("image_id"))
            and _is_int(record.get("category_id"))
            and isinstance(bbox, list | tuple)
            and len(bbox) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
        ):
            report.add(Issue.INVALID_ANNOTATION_RECORD, record.get("id"))
            continue
        image = images.get(record["image_id"])
        if image is None:
            report.add(Issue.ANNOTATION_UNKNOWN_IMAGE, record.get("id"))
            continue
        if record["category_id"] not in category_ids:
            report.add(Issue.UNKNOWN_CATEGORY, record.get("id"))
            continue
        annotation = _clean_annotation(record, (image["width"], image["height"]), report)
        if annotation is not None:
            by_image.setdefault(record["image_id"], []).append(annotation)
    return by_image


def _load_image(path: Path, verify: bool) -> tuple[bytes | None, Issue | None, tuple[int, int] | None, str]:
    """(bytes, issue, decoded (H, W), error text) for one image file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, Issue.MISSING_IMAGE_FILE, None, "file not found"
    except OSError as error:
        return None, Issue.CORRUPT_IMAGE, None, str(error)
    if not verify:
        return data, None, None, ""
    try:
        _, size = decode_image(data)
    except CorruptImageError as error:
        return None, Issue.CORRUPT_IMAGE, None, str(error)
    return data, None, size, ""


def _stream_images(
    images: list[dict[str, Any]], root: Path, cfg: ConvertConfig
) -> Iterator[tuple[dict[str, Any], tuple[bytes | None, Issue | None, tuple[int, int] | None, str]]]:
    """Read images in order with `num_threads` threads and at most 4 * num_threads in flight."""
    window: deque[tuple[dict[str, Any], Future]] = deque()
    with ThreadPoolExecutor(max_workers=cfg.num_threads) as pool:
        for record in images:
            window.append((record, pool.submit(_load_image, root / record["file_name"], cfg.verify_images)))
            if len(window) >= 4 * cfg.num_threads:
                head, future = window.popleft()
                yield head, future.result()
        while window:
            head, future = window.popleft()
            yield head, future.result()


def _prepare_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        state = "a complete dataset" if (out / META_FILENAME).is_file() else "files"
        raise DatasetExistsError(f"{out} already holds {state}; pass overwrite=True (--overwrite) to replace it")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_coco_to_shards(cfg: ConvertConfig) -> ConversionResult:
    """Convert a COCO-format dataset to Parquet shards in `cfg.out` (see module docstring).

    Returns:
        the meta written to `<out>/_meta.json` and the validation report (also in `<out>/_validation.json`).
    Raises:
        DatasetExistsError: `out` holds data and `overwrite` is off.
        CocoFormatError: the annotation file is not a COCO instances json.
        StrictValidationError: `strict` and at least one record was repaired or skipped; nothing is
            written except the report, saved as `<out>.validation.json` beside `out`.
    """
    out = cfg.out
    _prepare_out_dir(out, cfg.overwrite)
    coco = _load_coco(cfg.annotations)
    categories = _parse_categories(coco.get("categories", []))
    report = ValidationReport()
    report.images_in = len(coco.get("images", []))
    report.annotations_in = len(coco.get("annotations", []))
    images = _valid_images(coco.get("images", []), report)
    annotations = _index_annotations(
        coco.get("annotations", []), {im["id"]: im for im in images}, {c.id for c in categories}, report
    )
    del coco  # the raw records (segmentations included) are no longer needed

    tmp = out.resolve().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        shard_files, num_crowd = _write_shards(images, annotations, cfg, tmp, report)
        if cfg.strict and not report.ok:
            report_path = out.resolve().parent / f"{out.name}.validation.json"
            write_json_atomic(report_path, report.model_dump_json(indent=2))
            raise StrictValidationError(report, report_path)
        meta = DatasetMeta(
            categories=categories,
            counts=DatasetCounts(
                images=report.images_out,
                annotations=report.annotations_out,
                crowd_annotations=num_crowd,
                shards=len(shard_files),
            ),
            shards=shard_files,
            annotation_file=_stored_path(cfg.annotations, out),
            image_root=_stored_path(cfg.images, out),
            split=cfg.split,
        )
        write_json_atomic(tmp / VALIDATION_FILENAME, report.model_dump_json(indent=2))
        write_meta(tmp, meta)  # last: its presence marks the directory complete
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d images in %d shards to %s", meta.counts.images, meta.counts.shards, out)
    return ConversionResult(out_dir=out, meta=meta, report=report)


def _write_shards(
    images: list[dict[str, Any]],
    annotations: dict[int, list[_Annotation]],
    cfg: ConvertConfig,
    tmp: Path,
    report: ValidationReport,
) -> tuple[list[str], int]:
    num_crowd = 0
    writer = ShardWriter(tmp, int(cfg.shard_size_mb * 1024 * 1024), cfg.row_group_rows)
    with writer, tqdm(total=len(images), unit="img", desc="shards", disable=not cfg.progress) as bar:
        for record, (data, issue, decoded_size, error) in _stream_images(images, cfg.images, cfg):
            bar.update(1)
            image_id = record["id"]
            anns = annotations.pop(image_id, [])
            if issue is None and decoded_size is not None and decoded_size != (record["height"], record["width"]):
                issue, error = Issue.IMAGE_SIZE_MISMATCH, f"decoded (h, w) {decoded_size}"
            if issue is not None or data is None:
                issue = issue or Issue.CORRUPT_IMAGE
                logger.warning("skipping image %s (%s): %s: %s", image_id, record["file_name"], issue.value, error)
                report.add(issue, image_id)
                if anns:
                    report.add(Issue.ANNOTATION_OF_SKIPPED_IMAGE, image_id, count=len(anns))
                continue
            writer.add(
                {
                    "image_id": image_id,
                    "file_name": record["file_name"],
                    "width": record["width"],
                    "height": record["height"],
                    "image": data,
                    "boxes": [v for a in anns for v in a.box],
                    "category_ids": [a.category_id for a in anns],
                    "iscrowd": [a.iscrowd for a in anns],
                    "area": [a.area for a in anns],
                }
            )
            report.images_out += 1
            report.annotations_out += len(anns)
            num_crowd += sum(a.iscrowd for a in anns)
    return writer.close(), num_crowd
