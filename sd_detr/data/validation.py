"""Validation report of a COCO -> shards conversion: every repaired or skipped record is counted here.

Each `Issue` has one documented action. The report is printed at the end of a conversion and saved as
`_validation.json` beside the shards; with `strict=True` any *problem* (an issue whose action is not
`kept`) aborts the conversion with a non-zero exit and this report.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Issue(str, enum.Enum):
    """Why a record was repaired, skipped or flagged (values are the keys of the json report)."""

    INVALID_IMAGE_RECORD = "invalid_image_record"
    DUPLICATE_IMAGE_ID = "duplicate_image_id"
    MISSING_IMAGE_FILE = "missing_image_file"
    CORRUPT_IMAGE = "corrupt_image"
    IMAGE_SIZE_MISMATCH = "image_size_mismatch"
    INVALID_ANNOTATION_RECORD = "invalid_annotation_record"
    ANNOTATION_UNKNOWN_IMAGE = "annotation_unknown_image"
    ANNOTATION_OF_SKIPPED_IMAGE = "annotation_of_skipped_image"
    UNKNOWN_CATEGORY = "unknown_category"
    BOX_NON_POSITIVE_SIZE = "box_non_positive_size"
    BOX_OUTSIDE_IMAGE = "box_outside_image"
    BOX_CLIPPED = "box_clipped"
    CROWD_ANNOTATION = "crowd_annotation"
    ANNOTATION_ID_ASSIGNED = "annotation_id_assigned"
    AREA_FROM_BOX = "area_from_box"
    ISCROWD_MISSING = "iscrowd_missing"


ACTIONS: dict[Issue, str] = {
    Issue.INVALID_IMAGE_RECORD: "image skipped (id, file_name, width or height missing or invalid)",
    Issue.DUPLICATE_IMAGE_ID: "image skipped (the first record with this id is kept)",
    Issue.MISSING_IMAGE_FILE: "image skipped",
    Issue.CORRUPT_IMAGE: "image skipped (bytes do not decode, or above the decompression-bomb pixel limit)",
    Issue.IMAGE_SIZE_MISMATCH: "image skipped (decoded size differs from the json width/height)",
    Issue.INVALID_ANNOTATION_RECORD: (
        "annotation skipped (bbox/category_id/image_id missing or malformed, or iscrowd not 0/1)"
    ),
    Issue.ANNOTATION_UNKNOWN_IMAGE: "annotation skipped (its image_id has no image record)",
    Issue.ANNOTATION_OF_SKIPPED_IMAGE: "annotation skipped (its image was skipped)",
    Issue.UNKNOWN_CATEGORY: "annotation skipped",
    Issue.BOX_NON_POSITIVE_SIZE: "annotation skipped (w <= 0, h <= 0 or not finite)",
    Issue.BOX_OUTSIDE_IMAGE: "annotation skipped (no overlap with the image)",
    Issue.BOX_CLIPPED: "box repaired: clipped to the image",
    Issue.CROWD_ANNOTATION: "kept with iscrowd=1 (COCO eval ignores its region); excluded from training",
    Issue.ANNOTATION_ID_ASSIGNED: "kept; id missing, not a positive int, or a duplicate: a new unique id assigned",
    Issue.AREA_FROM_BOX: "kept; area missing or not positive: filled in as the box area w*h",
    Issue.ISCROWD_MISSING: "kept; iscrowd missing or null: filled in as 0",
}

# Issues that are information, not problems: they never fail a --strict conversion. The three filled-in
# fields are counted in the report; the filled values are what `_ground_truth.json` holds.
KEPT: frozenset[Issue] = frozenset(
    {Issue.CROWD_ANNOTATION, Issue.ANNOTATION_ID_ASSIGNED, Issue.AREA_FROM_BOX, Issue.ISCROWD_MISSING}
)


class ValidationReport(BaseModel):
    """Counts per issue and the first offending ids (image ids, or annotation ids for annotations)."""

    model_config = ConfigDict(extra="forbid")

    max_examples: int = Field(default=10, description="How many offending ids are kept per issue.")
    counts: dict[str, int] = Field(default_factory=dict, description="Issue value -> occurrences.")
    examples: dict[str, list[Any]] = Field(default_factory=dict, description="Issue value -> first ids.")
    images_in: int = Field(default=0, description="Image records read from the json.")
    annotations_in: int = Field(default=0, description="Annotation records read from the json.")
    images_out: int = Field(default=0, description="Images written to the shards.")
    annotations_out: int = Field(default=0, description="Annotations written to the shards.")

    def add(self, issue: Issue, record_id: Any, count: int = 1) -> None:
        """Count `count` occurrences of `issue` for the record `record_id` (image or annotation id)."""
        key = issue.value
        self.counts[key] = self.counts.get(key, 0) + count
        examples = self.examples.setdefault(key, [])
        if len(examples) < self.max_examples:
            examples.append(record_id)

    def count(self, issue: Issue) -> int:
        """Occurrences of `issue` (0 when never seen)."""
        return self.counts.get(issue.value, 0)

    @property
    def num_problems(self) -> int:
        """Occurrences of issues that repaired or skipped something (crowd annotations excluded)."""
        return sum(n for key, n in self.counts.items() if Issue(key) not in KEPT)

    @property
    def ok(self) -> bool:
        """True when nothing was repaired or skipped."""
        return self.num_problems == 0

    def format(self) -> str:
        """Human-readable table: one line per issue with its count, action and first ids."""
        lines = [
            f"validation report: images {self.images_out}/{self.images_in} written, "
            f"annotations {self.annotations_out}/{self.annotations_in} written, "
            f"{self.num_problems} problem(s)"
        ]
        for issue in Issue:
            n = self.count(issue)
            if n:
                ids = ", ".join(str(i) for i in self.examples.get(issue.value, []))
                lines.append(f"  {issue.value:<28} {n:>8}  {ACTIONS[issue]}; first ids: {ids}")
        if len(lines) == 1:
            lines.append("  no issues")
        return "\n".join(lines)
