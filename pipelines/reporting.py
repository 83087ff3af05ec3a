"""Artifacts of an evaluation: a precision-recall plot, val images drawn with their predictions and the
decoder attention maps (figures built on matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from torchvision.io import write_png

from sd_detr.box_ops import cxcywh_to_pixel_xyxy, size_scale
from sd_detr.diagnostics import draw_boxes, save_png
from sd_detr.evaluation import CocoEvaluator

if TYPE_CHECKING:
    from pipelines.config import TrainJobConfig
    from pipelines.distributed_eval import Evaluation

SCORE_THRESHOLD = 0.3


def precision_recall_figure(evaluator: CocoEvaluator) -> Figure:
    """Precision-recall curves (area all, 100 detections) at IoU 0.5, 0.75 and averaged over 0.5:0.95."""
    precision = evaluator.last_eval.eval["precision"]  # [T IoU, R recall, K classes, A areas, M max dets]
    recall = evaluator.last_eval.params.recThrs
    figure = Figure(figsize=(5, 4), dpi=100)
    axis = figure.subplots()
    for label, values in (
        ("IoU 0.50", precision[0, :, :, 0, -1]),
        ("IoU 0.75", precision[5, :, :, 0, -1]),
        ("IoU 0.50:0.95", precision[:, :, :, 0, -1].mean(0)),
    ):
        masked = np.where(values > -1, values, np.nan)
        axis.plot(
            recall, np.nanmean(masked, axis=1) if np.isfinite(masked).any() else np.zeros_like(recall), label=label
        )
    axis.set(xlabel="recall", ylabel="precision (mean over classes)", xlim=(0, 1), ylim=(0, 1.02))
    axis.legend(loc="lower left")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def draw_predictions(image: torch.Tensor, target: dict, detection: dict, mean, std) -> torch.Tensor:
    """uint8 [3, h, w] of the (transformed, unpadded) image with ground truth (green) and predictions
    above :data:`SCORE_THRESHOLD` (red, with score)."""
    height, width = (int(v) for v in target["size"].tolist())
    pixels = image[:, :height, :width] * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    pixels = (pixels.clamp(0, 1) * 255).to(torch.uint8)
    orig_h, orig_w = (float(v) for v in target["orig_size"].tolist())
    truth = cxcywh_to_pixel_xyxy(target["boxes"], height, width)
    keep = detection["scores"] > SCORE_THRESHOLD
    predicted = detection["boxes"][keep] * size_scale(height / orig_h, width / orig_w)
    labels = [f"{int(c)}:{s:.2f}" for c, s in zip(detection["labels"][keep], detection["scores"][keep], strict=True)]
    pixels = draw_boxes(pixels, truth, colors="lime", width=1)
    return draw_boxes(pixels, predicted, labels=labels, colors="red", width=1)


def log_evaluation_artifacts(
    client: MlflowClient, run_id: str, epoch: int, evaluation: Evaluation, cfg: TrainJobConfig
) -> None:
    """Log ``plots/pr_curve_epoch<N>.png``, ``predictions/epoch<N>/<image_id>.png`` and
    ``attention/epoch<N>/<image_id>.png`` (decoder cross-attention per stream) to the run."""
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        if evaluation.evaluator.last_eval is not None:
            path = save_png(precision_recall_figure(evaluation.evaluator), folder / f"pr_curve_epoch{epoch:03d}.png")
            client.log_artifact(run_id, str(path), artifact_path="plots")
        aug = cfg.data.augmentation
        for image, target, detection in evaluation.kept:
            path = folder / "predictions" / f"{int(target['image_id'])}.png"
            path.parent.mkdir(exist_ok=True)
            write_png(draw_predictions(image, target, detection, aug.mean, aug.std), str(path))
            client.log_artifact(run_id, str(path), artifact_path=f"predictions/epoch{epoch:03d}")
        for image_id, figure in evaluation.attention:
            path = save_png(figure, folder / "attention" / f"{image_id}.png")
            client.log_artifact(run_id, str(path), artifact_path=f"attention/epoch{epoch:03d}")
