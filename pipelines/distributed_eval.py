"""COCO evaluation spread over the DDP ranks.

Every rank predicts its own share of the val set (`pipelines.ray_data.build_datasets(val_shares=W)` gives
worker r the dataset ``val_rank{r}``; the shares are disjoint and cover every image once). Rank 0 gathers
compact per-image detections (numpy: top-k scores, category ids and xyxy boxes in original pixels, plus the
image's ground-truth boxes for the diagnostics) and runs COCOeval once, the score-IoU diagnostics once, and
keeps the first val images with their predictions for drawing. Every rank makes the same collectives,
also a rank whose share is empty. Outside a process group (`pipelines/evaluate.py`) the same code runs as
one rank, so training-time evaluation and `evaluate.py` score identical detections identically.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from pycocotools.coco import COCO

from pipelines.ddp import all_gather, gather_to_rank0, rank_and_world
from sd_detr.data.collate import DetectionBatch
from sd_detr.data.config import IMAGENET_MEAN, IMAGENET_STD
from sd_detr.data.meta import load_ground_truth
from sd_detr.diagnostics import attention_figures, score_iou_alignment, targets_to_pixel_xyxy
from sd_detr.engine import predict
from sd_detr.evaluation import COCO_STAT_NAMES, CocoEvaluator, coco_from_dict
from sd_detr.model import Detector
from sd_detr.names import VAL_CORRUPT_IMAGES, VAL_IMAGES, VAL_PREDICT_SECONDS, VAL_SECONDS, val_metric

KeptImage = tuple[torch.Tensor, dict, dict]
"""(image [3, h, w] normalized, cropped to its unpadded size; target; detection) of a drawn val image."""


@dataclass
class ImageDetections:
    """One evaluated image, as gathered to rank 0 (numpy on CPU).

    ``scores`` float32 [K], ``labels`` int64 [K] category ids, ``boxes`` float32 [K, 4] xyxy in original
    pixels (K = the top-k of :func:`sd_detr.engine.predict`); ``truth_boxes`` float32 [M, 4] xyxy original
    pixels and ``truth_labels`` int64 [M] category ids of the image's (non-crowd) ground truth.
    """

    image_id: int
    scores: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray
    truth_boxes: np.ndarray
    truth_labels: np.ndarray

    @classmethod
    def from_tensors(cls, image_id: int, detection: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]):
        """From one image's :func:`sd_detr.engine.predict` output and its
        :func:`sd_detr.diagnostics.targets_to_pixel_xyxy` ground truth (CPU tensors)."""
        return cls(
            image_id, detection["scores"].float().numpy(), detection["labels"].long().numpy(),
            detection["boxes"].float().numpy(), truth["boxes"].float().numpy(), truth["labels"].long().numpy(),
        )  # fmt: skip

    def detection(self) -> dict[str, torch.Tensor]:
        """``scores``/``labels``/``boxes`` as tensors (the format of :func:`sd_detr.engine.predict`)."""
        return {"scores": torch.from_numpy(self.scores), "labels": torch.from_numpy(self.labels),
                "boxes": torch.from_numpy(self.boxes)}  # fmt: skip

    def truth(self) -> dict[str, torch.Tensor]:
        """Ground truth as :func:`sd_detr.diagnostics.targets_to_pixel_xyxy` gives it."""
        return {"boxes": torch.from_numpy(self.truth_boxes), "labels": torch.from_numpy(self.truth_labels)}


@dataclass
class SharePredictions:
    """What one rank predicted on its share: every image, the corrupt-row count, the seconds it took, the first
    images kept for drawing, and (rank 0 only, never gathered) the first batch's attention figures."""

    images: list[ImageDetections] = field(default_factory=list)
    corrupt: int = 0
    seconds: float = 0.0
    kept: list[KeptImage] = field(default_factory=list)
    attention: list[tuple[int, Figure]] = field(default_factory=list)


@dataclass
class Evaluation:
    """One evaluation (on rank 0): metrics, the COCO evaluator, the first val images with their predictions,
    and the decoder attention figures of rank 0's first val batch."""

    metrics: dict[str, float]
    evaluator: CocoEvaluator
    kept: list[KeptImage]
    attention: list[tuple[int, Figure]]

    def coco_stats(self) -> dict[str, float]:
        """The 12 COCO statistics (``AP``, ``AP50``, ... ``ARl``)."""
        return {name: self.metrics[val_metric(name)] for name in COCO_STAT_NAMES}


def ground_truth_coco(dataset_dir: Path | str) -> COCO:
    """The pycocotools ground truth of a shard directory: the cleaned annotations that travel with the shards
    (:func:`sd_detr.data.meta.load_ground_truth`, never the source json). Read by rank 0 only."""
    return coco_from_dict(load_ground_truth(dataset_dir))


def predict_share(
    model: Detector,
    batches: Iterable[DetectionBatch],
    label_to_category_id: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    keep_images: int = 0,
    attention: bool = False,
    normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> SharePredictions:
    """Detections of every image in ``batches`` (this rank's share), on this process alone.

    Args:
        model: the plain detector (DDP's ``.module``); run in eval mode, its mode restored.
        batches: val batches (eval transform); empty batches (all rows corrupt) are counted and skipped.
        label_to_category_id: int64 [C] contiguous label -> COCO category id.
        keep_images: keep the first this many images with target and detection (for drawing).
        attention: also draw the decoder attention maps of the first ``keep_images`` images of the first batch.
        normalization: the (mean, std) the images were normalized with (the data config's), for drawing them.
    """
    share = SharePredictions()
    started = time.perf_counter()
    for batch in batches:
        share.corrupt += batch.num_corrupt
        if not len(batch):
            continue
        on_device = batch.to(device)
        orig_sizes = torch.stack([t["orig_size"] for t in on_device.targets])
        detections = predict(model, on_device.images, on_device.padding_mask, orig_sizes, label_to_category_id,
                             amp_dtype=amp_dtype)  # fmt: skip
        detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
        truths = targets_to_pixel_xyxy(batch.targets, label_to_category_id)
        for target, detection, truth in zip(batch.targets, detections, truths, strict=True):
            share.images.append(ImageDetections.from_tensors(int(target["image_id"]), detection, truth))
        if attention and keep_images and not share.attention:
            count = min(keep_images, len(batch))
            mean, std = normalization
            figures = attention_figures(
                model, on_device.images[:count], on_device.padding_mask[:count], mean=mean, std=std
            )
            share.attention = [(int(t["image_id"]), f) for t, f in zip(batch.targets[:count], figures, strict=True)]
        for index in range(min(len(batch), keep_images - len(share.kept))):
            height, width = (int(v) for v in batch.targets[index]["size"].tolist())
            share.kept.append(
                (batch.images[index][:, :height, :width].clone(), batch.targets[index], detections[index])
            )
    share.seconds = time.perf_counter() - started
    return share


def score(images: list[ImageDetections], ground_truth: COCO) -> tuple[dict[str, float], CocoEvaluator]:
    """COCO statistics and score-IoU diagnostics of gathered detections (``val_``-prefixed metrics)."""
    evaluator = CocoEvaluator(ground_truth)
    evaluator.update([image.image_id for image in images], [image.detection() for image in images])
    metrics = {val_metric(k): v for k, v in evaluator.summarize().items()}
    alignment = score_iou_alignment([image.detection() for image in images], [image.truth() for image in images])
    metrics |= {val_metric(k): v for k, v in alignment.items() if k.startswith(("score_iou", "best_regressed"))}
    metrics[VAL_IMAGES] = float(len(set(evaluator.image_ids)))
    return metrics, evaluator


def evaluate(
    model: Detector,
    batches: Iterable[DetectionBatch],
    ground_truth: COCO | None,
    label_to_category_id: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    keep_images: int = 0,
    normalization: tuple[Sequence[float], Sequence[float]] = (IMAGENET_MEAN, IMAGENET_STD),
) -> Evaluation | None:
    """Evaluate over all ranks; a collective, so every rank must call it once per evaluation.

    Each rank passes the batches of its own val share; rank 0 also passes ``ground_truth`` (the whole val
    set's) and gets the :class:`Evaluation`, the other ranks get None. Detections are gathered in rank order,
    and the shares of :func:`pipelines.ray_data.split_rows` are contiguous in file order, so rank 0 scores the
    detections in the order a single process would (pycocotools breaks score ties by that order). The kept
    images are the first ``keep_images`` of the val set: rank 0's, topped up from the next ranks' when its
    share is smaller. Metrics: the 12 COCO statistics, the score-IoU diagnostics, ``val_images``,
    ``val_corrupt_images``, ``val_predict_seconds`` (the slowest rank's prediction time) and ``val_seconds``
    (rank 0's whole evaluation, gathering and COCOeval included).
    """
    started = time.perf_counter()
    rank, _ = rank_and_world()
    share = predict_share(
        model, batches, label_to_category_id, device, amp_dtype, keep_images, rank == 0, normalization
    )
    counts = all_gather(len(share.images))
    wanted = max(0, keep_images - sum(counts[:rank]))  # images the ranks before this one cannot fill
    payload = SharePredictions(share.images, share.corrupt, share.seconds, share.kept[:wanted])
    gathered = gather_to_rank0(payload)
    if gathered is None:
        return None
    if ground_truth is None:
        raise ValueError("rank 0 needs the val ground truth to evaluate")
    images = [image for part in gathered for image in part.images]
    metrics, evaluator = score(images, ground_truth)
    metrics[VAL_CORRUPT_IMAGES] = float(sum(part.corrupt for part in gathered))
    metrics[VAL_PREDICT_SECONDS] = max(part.seconds for part in gathered)
    metrics[VAL_SECONDS] = time.perf_counter() - started
    kept = [item for part in gathered for item in part.kept][:keep_images]
    return Evaluation(metrics, evaluator, kept, share.attention)
