"""COCO instances json + image folder -> Parquet shards, with a validation report.

Streaming: the json is loaded once (annotation records only; segmentations are dropped as soon as they are
indexed), images are read and verified by a few threads through a bounded window, rows are written a row
group at a time, and the cleaned COCO ground truth of the kept rows is streamed to `_ground_truth.json`.
Atomic: everything goes to a hidden temporary directory beside `out`, `_meta.json` is written last and the
directory is renamed into place, so an interrupted run leaves no directory that looks complete. One
conversion per `out` at a time (`sd_detr.data.lock`). A conversion that keeps no image, or fewer than
`min_kept_fraction` of them, writes nothing and says where the images were looked for. See
`sd_detr.data.validation` for what is repaired, skipped, filled in or flagged.
"""

from __future__ import annotations

import json
import logging
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
from sd_detr.data.ground_truth import GroundTruthWriter
from sd_detr.data.lock import exclusive_lock
from sd_detr.data.meta import (
    META_FILENAME,
    VALIDATION_FILENAME,
    DatasetCounts,
    DatasetMeta,
    write_json_atomic,
    write_meta,
)
from sd_detr.data.records import Annotation, CocoFormatError, index_annotations, parse_categories, valid_images
from sd_detr.data.samples import CorruptImageError, decode_image, exif_orientation
from sd_detr.data.shards import ShardWriter
from sd_detr.data.validation import Issue, ValidationReport

logger = logging.getLogger(__name__)


class DatasetExistsError(FileExistsError):
    """The output directory already holds data and `overwrite` is off."""


class StrictValidationError(RuntimeError):
    """A `strict` conversion met at least one problem; nothing was written. `.report` has the details."""

    def __init__(self, report: ValidationReport, report_path: Path) -> None:
        super().__init__(f"{report.num_problems} problem(s) in strict mode; report: {report_path}")
        self.report = report
        self.report_path = report_path


class TooFewImagesError(RuntimeError):
    """The conversion kept no image, or fewer than `min_kept_fraction` of the json's; nothing was written.

    The message says how many were kept, which files were missing and where they were looked for.
    """

    def __init__(self, report: ValidationReport, report_path: Path, hint: str) -> None:
        super().__init__(f"{hint} Nothing was written; report: {report_path}")
        self.report = report
        self.report_path = report_path


@dataclass(frozen=True)
class ConversionResult:
    """What a conversion produced."""

    out_dir: Path
    meta: DatasetMeta
    report: ValidationReport


@dataclass
class _WriteResult:
    shard_files: list[str]
    num_crowd: int
    missing_files: list[str]  # the first few file names that were not found


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


def lock_path(out: Path) -> Path:
    """The lock file of conversions into `out`: `.<name>.lock` beside it (removed when a conversion ends)."""
    out = Path(out).resolve()
    return out.parent / f".{out.name}.lock"


def convert_coco_to_shards(cfg: ConvertConfig) -> ConversionResult:
    """Convert a COCO-format dataset to Parquet shards + `_ground_truth.json` in `cfg.out` (module docstring).

    `out`'s missing parent folders are created. Only one conversion into a given `out` runs at a time.

    Returns:
        the meta written to `<out>/_meta.json` and the validation report (also in `<out>/_validation.json`).
    Raises:
        LockHeldError: another conversion into `out` is running (the message names its pid and host).
        DatasetExistsError: `out` holds data and `overwrite` is off.
        CocoFormatError: the annotation file is not a COCO instances json.
        TooFewImagesError: no image, or fewer than `min_kept_fraction` of the json's, could be kept;
            nothing is written except the report, saved as `<out>.validation.json` beside `out`.
        StrictValidationError: `strict` and at least one record was repaired or skipped; nothing is
            written except the report, saved as `<out>.validation.json` beside `out`.
    """
    out = cfg.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock_path(out), f"conversion into {out}"):
        return _convert_locked(cfg)


def _remove_leftovers(out: Path) -> None:
    """Temp/old directories of conversions into `out` that died (safe: we hold `out`'s lock)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for leftover in out.resolve().parent.glob(pattern):
            logger.info("removing %s, left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _convert_locked(cfg: ConvertConfig) -> ConversionResult:
    out = cfg.out
    _prepare_out_dir(out, cfg.overwrite)
    _remove_leftovers(out)
    coco = _load_coco(cfg.annotations)
    categories = parse_categories(coco.get("categories", []))
    report = ValidationReport()
    report.images_in = len(coco.get("images", []))
    report.annotations_in = len(coco.get("annotations", []))
    images = valid_images(coco.get("images", []), report)
    annotations = index_annotations(
        coco.get("annotations", []), {im["id"]: im for im in images}, {c.id for c in categories}, report
    )
    info, licenses = coco.get("info"), coco.get("licenses")
    del coco  # the raw records (segmentations included) are no longer needed

    tmp = out.resolve().parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        ground_truth = GroundTruthWriter(
            tmp,
            categories,
            source=_stored_path(cfg.annotations, out),
            info=info if isinstance(info, dict) else None,
            licenses=licenses if isinstance(licenses, list) else None,
        )
        try:
            written = _write_shards(images, annotations, cfg, tmp, report, ground_truth)
        finally:
            ground_truth.close()
        report_beside = out.resolve().parent / f"{out.name}.validation.json"
        if report.images_out == 0 or report.images_out < cfg.min_kept_fraction * report.images_in:
            write_json_atomic(report_beside, report.model_dump_json(indent=2))
            raise TooFewImagesError(report, report_beside, _too_few_hint(cfg, report, written.missing_files))
        if cfg.strict and not report.ok:
            write_json_atomic(report_beside, report.model_dump_json(indent=2))
            raise StrictValidationError(report, report_beside)
        meta = DatasetMeta(
            categories=categories,
            counts=DatasetCounts(
                images=report.images_out,
                annotations=report.annotations_out,
                crowd_annotations=written.num_crowd,
                shards=len(written.shard_files),
            ),
            shards=written.shard_files,
            annotation_file=_stored_path(cfg.annotations, out),
            image_root=_stored_path(cfg.images, out),
            split=cfg.split,
        )
        ground_truth.finish()  # before _meta.json: a complete directory always has its ground truth
        write_json_atomic(tmp / VALIDATION_FILENAME, report.model_dump_json(indent=2))
        write_meta(tmp, meta)  # last: its presence marks the directory complete
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %d images in %d shards to %s", meta.counts.images, meta.counts.shards, out)
    return ConversionResult(out_dir=out, meta=meta, report=report)


def _find_elsewhere(root: Path, file_name: str, max_folders: int = 200) -> Path | None:
    """A folder next to or inside `root` that holds `file_name` (to suggest the right --images)."""
    candidates: list[Path] = []
    for base in (root, root.parent):
        try:
            candidates += sorted(p for p in base.iterdir() if p.is_dir() and p != root)[:max_folders]
        except OSError:
            continue
    return next((folder for folder in candidates if (folder / file_name).is_file()), None)


def _too_few_hint(cfg: ConvertConfig, report: ValidationReport, missing_files: list[str]) -> str:
    root = cfg.images.resolve()
    kept = f"kept {report.images_out} of the {report.images_in} image records of {cfg.annotations}"
    parts = [kept + ("" if report.images_out == 0 else f", fewer than --min-kept-fraction {cfg.min_kept_fraction:g}")]
    missing = report.count(Issue.MISSING_IMAGE_FILE)
    if missing:
        parts.append(f"{missing} file(s) not found in {root} (first file_names: {', '.join(missing_files)})")
        elsewhere = _find_elsewhere(root, missing_files[0]) if missing_files else None
        if elsewhere is not None:
            parts.append(f"{missing_files[0]} exists in {elsewhere}: is that the --images folder?")
        else:
            parts.append("check --images: the json's file_names are relative to it")
    for issue in (Issue.CORRUPT_IMAGE, Issue.IMAGE_SIZE_MISMATCH, Issue.INVALID_IMAGE_RECORD, Issue.DUPLICATE_IMAGE_ID):
        if report.count(issue):
            ids = ", ".join(str(i) for i in report.examples.get(issue.value, [])[:5])
            parts.append(f"{report.count(issue)} {issue.value} (first image ids: {ids})")
    return "; ".join(parts) + "."


def _size_mismatch_text(record: dict[str, Any], decoded_size: tuple[int, int], data: bytes) -> str:
    text = f"decoded (h, w) {decoded_size}, json (h, w) ({record['height']}, {record['width']})"
    orientation = exif_orientation(data)
    if decoded_size == (record["width"], record["height"]) and orientation >= 5:
        text += (
            f"; EXIF orientation {orientation} rotates this image by 90 degrees and the json gives the rotated "
            "size: boxes must refer to the stored pixel grid (COCO's convention, no EXIF rotation)"
        )
    return text


def _write_shards(
    images: list[dict[str, Any]],
    annotations: dict[int, list[Annotation]],
    cfg: ConvertConfig,
    tmp: Path,
    report: ValidationReport,
    ground_truth: GroundTruthWriter,
) -> _WriteResult:
    num_crowd = 0
    missing_files: list[str] = []
    writer = ShardWriter(tmp, int(cfg.shard_size_mb * 1024 * 1024), cfg.row_group_rows)
    with writer, tqdm(total=len(images), unit="img", desc="shards", disable=not cfg.progress) as bar:
        for record, (data, issue, decoded_size, error) in _stream_images(images, cfg.images, cfg):
            bar.update(1)
            image_id = record["id"]
            anns = annotations.pop(image_id, [])
            if issue is None and decoded_size is not None and decoded_size != (record["height"], record["width"]):
                issue, error = Issue.IMAGE_SIZE_MISMATCH, _size_mismatch_text(record, decoded_size, data or b"")
            if issue is not None or data is None:
                issue = issue or Issue.CORRUPT_IMAGE
                logger.warning("skipping image %s (%s): %s: %s", image_id, record["file_name"], issue.value, error)
                report.add(issue, image_id)
                if issue is Issue.MISSING_IMAGE_FILE and len(missing_files) < 5:
                    missing_files.append(record["file_name"])
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
            ground_truth.add_image(record, [a.coco_record(image_id) for a in anns])
            for annotation in anns:
                for filled in annotation.filled:
                    report.add(filled, annotation.ann_id)
            report.images_out += 1
            report.annotations_out += len(anns)
            num_crowd += sum(a.iscrowd for a in anns)
    return _WriteResult(writer.close(), num_crowd, missing_files)
