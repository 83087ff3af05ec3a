"""Evaluation diagnostics: score–IoU alignment of the detections and decoder cross-attention maps.

Both are plain functions of detections / a :class:`~sd_detr.model.Detector` and return numbers, tensors or
matplotlib figures; logging them (MLflow) is the pipeline's job. Figures are built with
``matplotlib.figure.Figure`` (Agg canvas, no pyplot, no display and no global backend switch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from scipy import stats
from torch import Tensor, nn
from torchvision.ops import box_iou
from torchvision.utils import draw_bounding_boxes

from sd_detr.box_ops import cxcywh_to_pixel_xyxy
from sd_detr.data.config import IMAGENET_MEAN, IMAGENET_STD
from sd_detr.model import Detector, DetectorOutput

# ---- score–IoU alignment --------------------------------------------------------------------------------


def targets_to_pixel_xyxy(
    targets: Sequence[Mapping[str, Tensor]], label_to_category_id: Tensor | None = None
) -> list[dict[str, Tensor]]:
    """Model targets (``boxes`` [M, 4] normalized cxcywh, ``labels`` [M], ``orig_size`` [2] = (h, w)) ->
    per image ``boxes`` [M, 4] xyxy in original pixels and ``labels`` [M], in the frame
    :func:`sd_detr.postprocess.postprocess` gives detections (labels mapped to category ids when a map is given).
    """
    converted = []
    for target in targets:
        height, width = target["orig_size"].float().tolist()
        labels = target["labels"].cpu()
        if label_to_category_id is not None:
            labels = label_to_category_id.cpu()[labels]
        converted.append({"boxes": cxcywh_to_pixel_xyxy(target["boxes"].cpu(), height, width), "labels": labels})
    return converted


def _correlations(scores: np.ndarray, ious: np.ndarray) -> tuple[float, float]:
    """(Spearman, Pearson) of two 1-D arrays; NaN when fewer than 2 points or either side is constant."""
    if scores.size < 2 or np.ptp(scores) == 0 or np.ptp(ious) == 0:
        return math.nan, math.nan
    return float(stats.spearmanr(scores, ious).statistic), float(stats.pearsonr(scores, ious).statistic)


def score_iou_alignment(
    detections: Sequence[Mapping[str, Tensor]],
    targets: Sequence[Mapping[str, Tensor]],
    top_k: int = 100,
    recall_top_n: int = 1,
    positive_iou: float = 0.5,
) -> dict[str, float]:
    """How well classification scores rank localization quality, over a set of images.

    Args:
        detections: per image ``scores`` [K], ``labels`` [K], ``boxes`` [K, 4] xyxy in original pixels (the
            output of :func:`sd_detr.postprocess.postprocess`).
        targets: per image ground truth ``boxes`` [M, 4] xyxy in the same pixels and ``labels`` [M] in the same
            label space (:func:`targets_to_pixel_xyxy` converts model targets).
        top_k: only each image's ``top_k`` highest-scoring detections are analysed.
        recall_top_n: an object counts as recalled when its best-regressed prediction is among the
            ``recall_top_n`` highest-scoring predictions assigned to it (1 = it is the top-scoring one).
        positive_iou: IoU threshold of the ``*_positive`` correlations.

    IoU is class-aware: a prediction's IoU is its highest IoU with a ground-truth box of its own label in its
    image (0 when there is none, e.g. a wrong class or an image without objects), and that box is the
    prediction's assigned object when the IoU is > 0.

    Returns (floats; NaN where a value is undefined, never an exception):
        - ``score_iou_spearman``, ``score_iou_pearson``: rank and linear correlation between score and IoU
          over all analysed predictions of all images pooled (IoU-0 predictions included). NaN with fewer
          than 2 predictions or when scores or IoUs are all equal.
        - ``score_iou_spearman_positive``, ``score_iou_pearson_positive``: the same over the predictions with
          IoU >= ``positive_iou`` only (does the score order the good boxes by quality?).
        - ``best_regressed_recall``: inspired by Align-DETR's "recall of best-regressed samples" (Cai et al.,
          2023, arXiv 2304.07527), which asks whether the prediction that localizes an object best also gets
          a high score. Ours: for every ground-truth object with at least one assigned prediction, take the
          assigned prediction with the highest IoU (the best-regressed one); the object is recalled when fewer
          than ``recall_top_n`` of its assigned predictions score strictly higher. The value is the recalled
          fraction of those objects; NaN when no object has an assigned prediction.
        - ``num_predictions``, ``num_objects``, ``num_objects_assigned``: the counts behind the values.
    """
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} images of detections but {len(targets)} of targets")
    if top_k < 1 or recall_top_n < 1:
        raise ValueError(f"top_k ({top_k}) and recall_top_n ({recall_top_n}) must be >= 1")
    all_scores, all_ious = [], []
    num_objects = num_assigned = num_recalled = 0
    for detection, target in zip(detections, targets, strict=True):
        scores = detection["scores"].detach().float().cpu()
        order = scores.argsort(descending=True, stable=True)[:top_k]
        scores = scores[order]
        labels = detection["labels"].cpu()[order]
        boxes = detection["boxes"].detach().float().cpu()[order]
        gt_boxes, gt_labels = target["boxes"].float().cpu(), target["labels"].cpu()
        num_objects += len(gt_labels)
        iou = box_iou(boxes, gt_boxes) * (labels[:, None] == gt_labels[None, :])  # [K, M], 0 across classes
        if iou.numel() == 0:  # no detections or no objects: nothing to assign
            best_iou = torch.zeros(len(scores))
        else:
            best_iou, best_object = iou.max(dim=1)
            # assigned[k, m]: prediction k's best-matching object (same class, IoU > 0) is m
            assigned = (best_object[:, None] == torch.arange(iou.shape[1])[None, :]) & (best_iou[:, None] > 0)
            has_prediction = assigned.any(dim=0)
            best_regressed = torch.where(assigned, best_iou[:, None], -1.0).argmax(dim=0)  # [M]
            rivals = torch.where(assigned, scores[:, None], -math.inf) > scores[best_regressed][None, :]
            recalled = (rivals.sum(dim=0) < recall_top_n) & has_prediction
            num_assigned += int(has_prediction.sum())
            num_recalled += int(recalled.sum())
        all_scores.append(scores)
        all_ious.append(best_iou)
    scores_np = torch.cat(all_scores).numpy() if all_scores else np.zeros(0)
    ious_np = torch.cat(all_ious).numpy() if all_ious else np.zeros(0)
    spearman, pearson = _correlations(scores_np, ious_np)
    positive = ious_np >= positive_iou
    spearman_positive, pearson_positive = _correlations(scores_np[positive], ious_np[positive])
    return {
        "score_iou_spearman": spearman,
        "score_iou_pearson": pearson,
        "score_iou_spearman_positive": spearman_positive,
        "score_iou_pearson_positive": pearson_positive,
        "best_regressed_recall": num_recalled / num_assigned if num_assigned else math.nan,
        "num_predictions": float(scores_np.size),
        "num_objects": float(num_objects),
        "num_objects_assigned": float(num_assigned),
    }


# ---- cross-attention maps -------------------------------------------------------------------------------


@dataclass
class CrossAttentionMaps:
    """Head-averaged cross-attention of the last decoder layer for every slot of a batch.

    - ``maps``: stream name -> [B, N, h, w] weights over the memory cells (each slot's map sums to 1 over the
      valid cells, 0 on padded ones). ``"classification"`` and ``"localization"`` for ``sd_detr``,
      ``"single"`` for ``conditional_detr``.
    - ``padding_mask`` [B, h, w] bool (True = padded cell); ``outputs``: the forward pass they come from.
    """

    maps: dict[str, Tensor]
    padding_mask: Tensor
    outputs: DetectorOutput


def _last_layer_attention(model: Detector) -> dict[str, nn.Module]:
    """The last decoder layer's cross-attention module per stream (the shared one under ``"shared"``)."""
    layer = model.decoding.decoder.layers[-1]
    match model.config.variant:
        case "conditional_detr":
            return {"single": layer.cross_block.attn}
        case "sd_detr" if layer.divided:
            return {"classification": layer.cls_cross.attn, "localization": layer.loc_cross.attn}
        case "sd_detr":
            return {"shared": layer.shared_cross.attn}
        case other:
            raise ValueError(f"no cross-attention maps for model variant {other!r}")


@torch.no_grad()
def decoder_cross_attention_maps(model: Detector, images: Tensor, padding_mask: Tensor) -> CrossAttentionMaps:
    """Run ``model`` in eval mode on images [B, 3, H, W] (normalized) with padding_mask [B, H, W] (True = padded)
    and return the last decoder layer's cross-attention maps of every slot per stream.

    ``model`` is the plain :class:`Detector` (unwrap DDP's ``.module`` first); its train/eval mode is restored.

    The inputs of the last layer's cross-attention modules are captured with forward pre-hooks (the decoders
    are not modified) and their ``attention_map`` is evaluated on them. The hooks are removed afterwards,
    also when the forward pass raises. In an SD-DETR layer before ``query_split`` the shared module runs once
    on the concatenated [classification ; localization] tokens; its map is split back by N.
    """
    captured: dict[str, tuple[tuple, dict]] = {}
    feature_masks: list[Tensor] = []
    handles = [
        model.backbone.register_forward_hook(lambda _module, _args, output: feature_masks.append(output.padding_mask))
    ]
    modules = _last_layer_attention(model)
    for name, module in modules.items():

        def capture(_module: nn.Module, args: tuple, kwargs: dict, name: str = name) -> None:
            captured[name] = (args, kwargs)

        handles.append(module.register_forward_pre_hook(capture, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        outputs = model(images, padding_mask)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    grid_mask = feature_masks[-1]
    maps = {name: modules[name].attention_map(*args, **kwargs) for name, (args, kwargs) in captured.items()}
    if "shared" in maps:
        classification, localization = maps.pop("shared").chunk(2, dim=1)
        maps = {"classification": classification, "localization": localization}
    maps = {name: value.float().unflatten(-1, grid_mask.shape[-2:]) for name, value in maps.items()}
    return CrossAttentionMaps(maps=maps, padding_mask=grid_mask, outputs=outputs)


def top_slots(logits: Tensor, num: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``num`` slots with the highest max-class sigmoid score: logits [B, N, C] ->
    (slots [B, num] long, scores [B, num], labels [B, num] contiguous), best first."""
    best, labels = logits.float().sigmoid().max(dim=-1)
    scores, slots = best.topk(min(num, best.shape[1]), dim=1)
    return slots, scores, labels.gather(1, slots)


# ---- rendering ------------------------------------------------------------------------------------------


def unnormalize_image(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """A normalized model input [3, H, W] -> RGB [3, H, W] float in [0, 1]."""
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1)


def attention_on_pixels(maps: Tensor, valid_size: tuple[int, int], stride: int | tuple[int, int]) -> Tensor:
    """Feature-grid weights [K, h, w] -> [K, valid_h, valid_w] float on the image's pixels (CPU).

    ``stride`` (int): pixels per cell, cell (i, j) covering [i s, (i + 1) s) x [j s, (j + 1) s) as the
    backbone's features do, whatever padding the batch added; a (H, W) pair instead: the grid spans exactly
    H x W pixels. Upsampled bilinearly, then cropped to the top-left ``valid_size``.
    """
    grid_h, grid_w = maps.shape[-2:]
    size = (grid_h * stride, grid_w * stride) if isinstance(stride, int) else stride
    valid_h, valid_w = valid_size
    if size[0] < valid_h or size[1] < valid_w:
        raise ValueError(f"a {grid_h} x {grid_w} grid spanning {size} px does not cover {valid_h} x {valid_w} px")
    upsampled = F.interpolate(maps.detach().float().cpu()[:, None], size=size, mode="bilinear")
    return upsampled[:, 0, :valid_h, :valid_w]


def render_attention_maps(
    image: Tensor,
    maps_by_stream: Mapping[str, Tensor],
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    valid_size: tuple[int, int] | None = None,
    label_names: Mapping[int, str] | None = None,
    panel_inches: float = 3.0,
    dpi: int = 100,
    stride: int | None = None,
) -> Figure:
    """Attention maps over the image, one column per stream and one row per detection.

    Args:
        image: [3, H, W] RGB, float in [0, 1] or uint8, the (possibly padded) image the model saw.
        maps_by_stream: stream name -> [K, h, w] weights on the feature grid.
        boxes: [K, 4] xyxy in pixels of ``image``; scores [K]; labels [K] (ints, named via ``label_names``).
        valid_size: (height, width) in pixels of the unpadded image; the panels are cropped to it.
        stride: pixels per feature cell (the backbone's ``stride``): cell (i, j) covers pixels
            [i s, (i + 1) s) x [j s, (j + 1) s), so a grid of a batch padded beyond ``image`` still lands where
            its features came from. None: the grid covers exactly H x W.
    Each map is upsampled bilinearly to (h s) x (w s) (or H x W), cropped to the valid area and drawn with its own colour
    scale (0 to its maximum, "jet", half transparent) over the image in grey, with the detection's box. Returns a figure of
    ``len(maps_by_stream) * panel_inches`` x ``K * panel_inches`` inches at ``dpi``.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    valid_h, valid_w = valid_size if valid_size is not None else (height, width)
    rgb = image.float() / 255 if image.dtype == torch.uint8 else image.float()
    # grey background so the colour map reads unambiguously (ITU-R BT.601 luma)
    luma = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
    grey = (rgb.detach().cpu()[:, :valid_h, :valid_w] * luma).sum(0).clamp(0, 1).numpy()
    streams = list(maps_by_stream)
    num_rows = len(boxes)
    for name, stream_maps in maps_by_stream.items():
        if stream_maps.dim() != 3 or stream_maps.shape[0] != num_rows:
            raise ValueError(f"maps of stream {name!r} must be [{num_rows}, h, w], got {tuple(stream_maps.shape)}")
    figure = Figure(figsize=(panel_inches * len(streams), panel_inches * max(num_rows, 1)), dpi=dpi)
    if num_rows == 0:
        figure.text(0.5, 0.5, "no detections", ha="center", va="center")
        return figure
    axes = figure.subplots(num_rows, len(streams), squeeze=False)
    for column, name in enumerate(streams):
        upsampled = attention_on_pixels(maps_by_stream[name], (valid_h, valid_w), stride or (height, width)).numpy()
        for row in range(num_rows):
            ax = axes[row, column]
            ax.imshow(grey, cmap="gray", vmin=0.0, vmax=1.0)
            ax.imshow(upsampled[row], cmap="jet", alpha=0.5, vmin=0.0, vmax=max(float(upsampled[row].max()), 1e-12))
            x0, y0, x1, y1 = boxes[row].tolist()
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=1.5))
            label = int(labels[row])
            label_text = label_names.get(label, str(label)) if label_names is not None else str(label)
            ax.set_title(f"{name}: {label_text} {float(scores[row]):.2f}", fontsize=8)
            ax.set_axis_off()
    figure.tight_layout()
    return figure


def attention_figures(
    model: Detector,
    images: Tensor,
    padding_mask: Tensor,
    num_detections: int = 3,
    label_names: Mapping[int, str] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[Figure]:
    """One figure per image of a batch: the last decoder layer's cross-attention of its ``num_detections``
    top-scoring slots, per stream (SD-DETR: classification | localization; Conditional DETR: single).

    images [B, 3, H, W] normalized with ``mean``/``std`` (the data config's), padding_mask [B, H, W] (True =
    padded); ``label_names`` maps contiguous labels to names for the titles. Each feature cell is drawn over
    the ``model.backbone.stride`` pixels it covers, whatever the batch's padding.
    """
    attention = decoder_cross_attention_maps(model, images, padding_mask)
    slots, scores, labels = top_slots(attention.outputs.logits, num_detections)
    figures = []
    for index in range(images.shape[0]):
        valid_h = int((~padding_mask[index]).any(dim=1).sum())
        valid_w = int((~padding_mask[index]).any(dim=0).sum())
        boxes = cxcywh_to_pixel_xyxy(attention.outputs.boxes[index, slots[index]].cpu(), valid_h, valid_w)
        maps = {name: value[index, slots[index]] for name, value in attention.maps.items()}
        figures.append(
            render_attention_maps(
                unnormalize_image(images[index], mean, std),
                maps,
                boxes,
                scores[index],
                labels[index],
                (valid_h, valid_w),
                label_names,
                stride=model.backbone.stride,
            )
        )
    return figures


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG file (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def draw_boxes(pixels: torch.Tensor, boxes: torch.Tensor, **style) -> torch.Tensor:
    """torchvision's ``draw_bounding_boxes`` of ``boxes`` [n, 4] pixel xyxy on uint8 ``pixels`` [3, h, w]; with no
    box, ``pixels`` as they are (torchvision would warn about every empty image)."""
    return draw_bounding_boxes(pixels, boxes, **style) if len(boxes) else pixels
