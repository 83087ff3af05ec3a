"""COCO evaluation with pycocotools: detections in original pixels -> the 12 standard COCO statistics."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from sd_detr.box_ops import size_scale, xyxy_to_xywh

COCO_STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """Build a pycocotools ``COCO`` index from an in-memory COCO-format dict (quietly)."""
    coco = COCO()
    coco.dataset = copy.deepcopy(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections_to_coco_results(image_ids: Iterable[int], detections: list[dict[str, Tensor]]) -> list[dict]:
    """Per-image detections (``scores`` [K], ``labels`` [K] category ids, ``boxes`` [K, 4] xyxy pixels) ->
    COCO results entries with ``bbox`` in xywh pixels."""
    results = []
    for image_id, detection in zip(image_ids, detections, strict=True):
        boxes = xyxy_to_xywh(detection["boxes"].float().cpu()).tolist()
        for score, label, box in zip(detection["scores"].tolist(), detection["labels"].tolist(), boxes, strict=True):
            results.append({"image_id": int(image_id), "category_id": int(label), "bbox": box, "score": score})
    return results


class CocoEvaluator:
    """Accumulates detections over a dataset and computes COCO bbox AP with pycocotools.

    Only images passed to :meth:`update` are evaluated (so a subset can be scored). With no detections at
    all, every statistic is 0.0 (pycocotools cannot load an empty result list).
    """

    def __init__(self, ground_truth: COCO) -> None:
        self.ground_truth = ground_truth
        self.results: list[dict] = []
        self.image_ids: list[int] = []
        self.last_eval: COCOeval | None = None  # the pycocotools evaluation of the last `summarize`, if any

    def update(self, image_ids: Iterable[int], detections: list[dict[str, Tensor]]) -> None:
        """Add detections of the given images (see :func:`detections_to_coco_results`)."""
        image_ids = [int(i) for i in image_ids]
        unknown = [i for i in image_ids if i not in self.ground_truth.imgs]
        if unknown:
            raise KeyError(f"image ids not in the ground truth: {unknown[:5]}")
        self.image_ids.extend(image_ids)
        self.results.extend(detections_to_coco_results(image_ids, detections))

    def summarize(self) -> dict[str, float]:
        """The 12 COCO statistics (``AP``, ``AP50``, ... ``ARl``) over the images seen so far.

        A size range without ground truth gives -1.0, as pycocotools does.
        """
        if not self.results:
            return dict.fromkeys(COCO_STAT_NAMES, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):
            detections = self.ground_truth.loadRes(copy.deepcopy(self.results))
            evaluation = COCOeval(self.ground_truth, detections, iouType="bbox")
            evaluation.params.imgIds = sorted(set(self.image_ids))
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        self.last_eval = evaluation
        return {name: float(value) for name, value in zip(COCO_STAT_NAMES, np.asarray(evaluation.stats), strict=True)}


def targets_to_coco(
    targets: list[dict[str, Tensor]], label_to_category_id: Tensor, categories: list[dict] | None = None
) -> dict[str, Any]:
    """COCO ground-truth dict from model targets (``image_id``, ``orig_size`` (h, w), normalized cxcywh
    ``boxes``, contiguous ``labels``): used to score a model on in-memory data."""
    images, annotations = [], []
    for target in targets:
        height, width = (int(v) for v in target["orig_size"].tolist())
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": height, "width": width})
        cx, cy, w, h = (target["boxes"].float().cpu() * size_scale(height, width)).unbind(-1)
        xywh = torch.stack([cx - w / 2, cy - h / 2, w, h], dim=-1)
        for box, label in zip(xywh.tolist(), target["labels"].tolist(), strict=True):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "bbox": box, "area": box[2] * box[3],
                "iscrowd": 0, "category_id": int(label_to_category_id[label]),
            })  # fmt: skip
    if categories is None:
        categories = [{"id": int(c), "name": str(int(c))} for c in label_to_category_id.tolist()]
    return {"images": images, "annotations": annotations, "categories": categories}
