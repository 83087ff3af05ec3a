"""COCO records -> clean records: categories, image records, annotations (validated, clipped, completed).

Every repaired, skipped or filled-in record is counted in the `ValidationReport` (see
`sd_detr.data.validation` for the action of each issue). Used by `sd_detr.data.coco`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sd_detr.data.meta import Category
from sd_detr.data.validation import Issue, ValidationReport

CLIP_TOLERANCE_PX = 1e-3


class CocoFormatError(ValueError):
    """The annotation file is not a COCO instances json (wrong top-level structure or categories)."""


@dataclass
class Annotation:
    """One kept annotation: final id, box xywh px (clipped), COCO category id, crowd flag, area px^2."""

    ann_id: int
    box: tuple[float, float, float, float]
    category_id: int
    iscrowd: int
    area: float
    filled: tuple[Issue, ...]  # fields filled in (id, area, iscrowd): counted when the image is kept

    def coco_record(self, image_id: int) -> dict[str, Any]:
        """The cleaned COCO annotation record of `_ground_truth.json`."""
        return {
            "id": self.ann_id,
            "image_id": image_id,
            "category_id": self.category_id,
            "bbox": list(self.box),
            "area": self.area,
            "iscrowd": self.iscrowd,
        }


def is_int(value: Any) -> bool:
    """True for Python/json ints (bools excluded)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_iscrowd(record: dict[str, Any]) -> bool:
    """True when `iscrowd` is absent or null (filled in as 0) or an int/bool 0 or 1: a string such as "0" is
    not guessed at (truthy "0" would have made a crowd region)."""
    value = record.get("iscrowd")
    return value is None or (isinstance(value, int) and value in (0, 1))


def parse_categories(records: list[dict[str, Any]]) -> list[Category]:
    """The json's categories, sorted by id. Raises CocoFormatError on a malformed record, an id that is not
    an int (1.7, "2", true: never coerced, as annotations name categories by exact id) or a repeated id."""
    for record in records:
        if isinstance(record, dict) and not is_int(record.get("id")):
            found = repr(record["id"]) if "id" in record else "no id"
            raise CocoFormatError(
                f"invalid category record (name {record.get('name')!r}): id must be an int, got {found}"
            )
    try:
        categories = [
            Category(id=c["id"], name=str(c["name"]), supercategory=str(c.get("supercategory") or "")) for c in records
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise CocoFormatError(f"invalid category record: {error}") from error
    ids = [c.id for c in categories]
    if len(set(ids)) != len(ids):
        raise CocoFormatError(f"duplicate category ids in the annotation file: {sorted(ids)}")
    return sorted(categories, key=lambda c: c.id)


def valid_images(records: list[dict[str, Any]], report: ValidationReport) -> list[dict[str, Any]]:
    """Image records with a usable id, file name and size; duplicates after the first are skipped."""
    seen: set[int] = set()
    images = []
    for record in records:
        image_id = record.get("id") if isinstance(record, dict) else None
        ok = (
            is_int(image_id)
            and isinstance(record.get("file_name"), str)
            and record["file_name"] != ""
            and is_int(record.get("width"))
            and is_int(record.get("height"))
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


def clean_annotation(
    record: dict[str, Any], size: tuple[int, int], ann_id: int, filled: tuple[Issue, ...], report: ValidationReport
) -> Annotation | None:
    """Validate and clip one annotation whose image and category are known. `size` = (width, height);
    `ann_id` its final id; `filled` = (ANNOTATION_ID_ASSIGNED,) when that id is new, else ()."""
    source_id = record.get("id")  # what the report names for skips and repairs (the json's id)
    x, y, w, h = (float(v) for v in record["bbox"])
    if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
        report.add(Issue.BOX_NON_POSITIVE_SIZE, source_id)
        return None
    width, height = size
    x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        report.add(Issue.BOX_OUTSIDE_IMAGE, source_id)
        return None
    box = (x, y, w, h)  # within float noise of the image: the original numbers are kept exactly
    if max(abs(x0 - x), abs(y0 - y), abs(x1 - x - w), abs(y1 - y - h)) > CLIP_TOLERANCE_PX:
        report.add(Issue.BOX_CLIPPED, source_id)
        box = (x0, y0, x1 - x0, y1 - y0)
    iscrowd = int(record.get("iscrowd") or 0)  # 0/1, a bool or null: checked by `index_annotations`
    if iscrowd:
        report.add(Issue.CROWD_ANNOTATION, source_id)
    if record.get("iscrowd") is None:
        filled += (Issue.ISCROWD_MISSING,)
    area = record.get("area")
    valid_area = isinstance(area, int | float) and not isinstance(area, bool) and math.isfinite(area) and area > 0
    if not valid_area:
        filled += (Issue.AREA_FROM_BOX,)
    area = float(area) if valid_area else box[2] * box[3]
    return Annotation(ann_id, box, int(record["category_id"]), iscrowd, area, filled)


def index_annotations(
    records: list[dict[str, Any]],
    images: dict[int, dict[str, Any]],
    category_ids: set[int],
    report: ValidationReport,
) -> dict[int, list[Annotation]]:
    """Valid annotations per image id, in json order (ids made unique, box clipped, area/iscrowd completed)."""
    by_image: dict[int, list[Annotation]] = {}
    # pycocotools needs unique annotation ids, and treats id 0 as "unmatched": ids must be ints >= 1. The first
    # valid annotation with an id keeps it; missing, non-positive and repeated ids get new ones after the max.
    source_ids = [r.get("id") for r in records if isinstance(r, dict) and is_int(r.get("id"))]
    next_id = max([0, *source_ids]) + 1
    used_ids: set[int] = set()
    for record in records:
        if not isinstance(record, dict):
            report.add(Issue.INVALID_ANNOTATION_RECORD, None)
            continue
        bbox = record.get("bbox")
        if not (
            is_int(record.get("image_id"))
            and is_int(record.get("category_id"))
            and isinstance(bbox, list | tuple)
            and len(bbox) == 4
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in bbox)
            and _valid_iscrowd(record)
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
        ann_id, filled = record.get("id"), ()
        if not is_int(ann_id) or ann_id < 1 or ann_id in used_ids:
            ann_id, filled, next_id = next_id, (Issue.ANNOTATION_ID_ASSIGNED,), next_id + 1
        annotation = clean_annotation(record, (image["width"], image["height"]), ann_id, filled, report)
        if annotation is not None:
            used_ids.add(ann_id)
            by_image.setdefault(record["image_id"], []).append(annotation)
    return by_image
