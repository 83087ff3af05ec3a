"""Set-prediction losses: sigmoid focal, L1, GIoU, SD-DETR's alignment loss, and the criterion that
applies them to every decoder layer (and the TAQ mini-detector). All computed in fp32, autocast off."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

from sd_detr.box_ops import cxcywh_to_xyxy
from sd_detr.config import LossConfig
from sd_detr.heads import Predictions
from sd_detr.matcher import Assignment, HungarianMatcher
from sd_detr.names import ALIGN_TERM, BBOX_TERM, CLASS_TERM, ENCODER_OUTPUT, GIOU_TERM, layer_index, layer_key


@dataclass
class LossOutput:
    """``total``: scalar to backpropagate (weighted sum over outputs and terms); ``per_output``: the
    unweighted, detached terms of each output (``layer_0`` .. ``layer_{L-1}``, ``encoder``)."""

    total: Tensor
    per_output: dict[str, dict[str, Tensor]]

    def final_terms(self) -> dict[str, Tensor]:
        """Unweighted terms of the last decoder layer."""
        layers = [name for name in self.per_output if layer_index(name) is not None]
        return self.per_output[max(layers, key=layer_index)]


@dataclass
class MatchedPairs:
    """The matched (prediction, target) pairs of one output as index tensors [K] int64 on the device: ``image``
    and ``slot`` of each matched prediction, and ``target``, its target's index in :class:`BatchTargets`."""

    image: Tensor
    slot: Tensor
    target: Tensor


@dataclass
class BatchTargets:
    """The targets of a batch concatenated in image order: ``labels`` [T] int64, ``boxes`` [T, 4] normalized
    cxcywh (T = all target boxes of the batch)."""

    labels: Tensor
    boxes: Tensor

    @classmethod
    def concatenate(cls, targets: list[dict[str, Tensor]]) -> BatchTargets:
        """Concatenate per-image ``labels`` [T_i] and ``boxes`` [T_i, 4]."""
        return cls(torch.cat([t["labels"] for t in targets]), torch.cat([t["boxes"] for t in targets]))


def matched_pairs(
    assignments: list[list[Assignment]], targets: list[dict[str, Tensor]], device: torch.device
) -> list[MatchedPairs]:
    """The matcher's assignments of several outputs (per output, per image; host tensors) as
    :class:`MatchedPairs` on ``device``, all of them moved in one non-blocking host-to-device copy: the host
    does not wait for the device, and no output's loss waits for a copy of its own."""
    offsets = [0]
    for image_targets in targets[:-1]:
        offsets.append(offsets[-1] + len(image_targets["labels"]))
    columns = []
    for per_image in assignments:
        image = torch.cat([torch.full_like(pred, index) for index, (pred, _) in enumerate(per_image)])
        slot = torch.cat([pred for pred, _ in per_image])
        target = torch.cat([tgt + offset for offset, (_, tgt) in zip(offsets, per_image, strict=True)])
        columns.append(torch.stack([image, slot, target]))
    on_device = torch.cat(columns, dim=1).to(device, non_blocking=True)
    return [MatchedPairs(*chunk) for chunk in on_device.split([c.shape[1] for c in columns], dim=1)]


def one_hot_targets(logits: Tensor, pairs: MatchedPairs, batch_targets: BatchTargets) -> Tensor:
    """[B, N, C] float: 1 at (image, matched slot, its target's label), else 0."""
    onehot = torch.zeros_like(logits)
    onehot[pairs.image, pairs.slot, batch_targets.labels[pairs.target]] = 1.0
    return onehot


def focal_loss(
    logits: Tensor, onehot: Tensor, num_boxes: float | Tensor, alpha: float, gamma: float, valid: Tensor | None = None
) -> Tensor:
    """Sigmoid focal loss summed over all (slot, class) pairs and divided by ``num_boxes``; with ``valid``
    [B, N] bool only the valid slots' pairs count (logits, onehot [B, N, C])."""
    if valid is None:
        return sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="sum") / num_boxes
    per_pair = sigmoid_focal_loss(logits, onehot, alpha=alpha, gamma=gamma, reduction="none")
    return (per_pair * valid[..., None].to(per_pair.dtype)).sum() / num_boxes


def box_losses(predicted: Tensor, target: Tensor, num_boxes: float | Tensor) -> tuple[Tensor, Tensor]:
    """L1 and (1 - GIoU) of matched pairs: predicted, target [K, 4] normalized cxcywh -> two scalars."""
    l1 = F.l1_loss(predicted, target, reduction="sum") / num_boxes
    giou = torch.diag(generalized_box_iou(cxcywh_to_xyxy(predicted), cxcywh_to_xyxy(target)))
    return l1, (1 - giou).sum() / num_boxes


def alignment_loss(
    logits: Tensor,
    onehot: Tensor,
    matched_iou: Tensor,
    num_boxes: float | Tensor,
    alpha: float,
    beta: float,
    gamma: float,
    valid: Tensor | None = None,
) -> Tensor:
    """SD-DETR task-alignment loss (IoU-aware BCE), docs/method.md 2.3.

    For each matched (slot, ground-truth class) pair with score s = sigmoid(logit) and IoU u of its box
    with the ground truth, the target is t = s^alpha * u^beta (s, u detached), weight 1. Every other
    (slot, class) pair has target 0 and weight s^gamma (detached). Sum / ``num_boxes``.

    logits, onehot [B, N, C]; matched_iou [B, N] (IoU of matched slots, anything elsewhere); ``valid``
    [B, N] bool or None: invalid slots get weight 0.
    """
    scores = logits.sigmoid().detach()
    positive = onehot > 0
    soft = scores.pow(alpha) * matched_iou.detach().clamp(min=0.0)[..., None].pow(beta)
    target = torch.where(positive, soft, torch.zeros_like(scores))
    weight = torch.where(positive, torch.ones_like(scores), scores.pow(gamma))
    if valid is not None:
        weight = weight * valid[..., None].to(weight.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (bce * weight).sum() / num_boxes


def mean_over_workers_identity(count: Tensor) -> Tensor:
    """Single-process number-of-boxes normalizer: returns ``count`` unchanged."""
    return count


class SetCriterion(nn.Module):
    """DETR set loss on every output: Hungarian matching, then weighted focal + L1 + GIoU (+ alignment).

    ``average_across_workers`` maps the local number of target boxes (a 1-element float tensor) to its
    mean over all data-parallel workers (e.g. an all-reduce); it is injected so this library stays free of
    any cluster framework.
    """

    def __init__(
        self,
        matcher: HungarianMatcher,
        config: LossConfig,
        average_across_workers: Callable[[Tensor], Tensor] = mean_over_workers_identity,
    ) -> None:
        super().__init__()
        self.matcher = matcher
        self.config = config
        self.average_across_workers = average_across_workers

    def num_boxes(self, targets: list[dict[str, Tensor]], device: torch.device) -> Tensor:
        """Mean number of target boxes per worker, at least 1: a 0-dim float tensor on ``device`` that the
        losses divide by on the device (it is never read on the host: no synchronisation)."""
        count = torch.full((1,), float(sum(len(t["labels"]) for t in targets)), device=device)
        return self.average_across_workers(count).clamp(min=1.0).reshape(())

    def output_terms(
        self,
        prediction: Predictions,
        targets: list[dict[str, Tensor]],
        num_boxes: float | Tensor,
        with_alignment: bool,
        assignments: list[Assignment] | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted loss terms (``class``, ``bbox``, ``giou`` and optionally ``align``) of one output.

        Slots with ``prediction.valid`` False are never matched and get no focal (or alignment) loss.
        ``assignments`` are the matcher's for this output (computed here when None).
        """
        if assignments is None:
            assignments = self.matcher(prediction.logits.float(), prediction.boxes.float(), targets, prediction.valid)
        pairs = matched_pairs([assignments], targets, prediction.boxes.device)[0]
        return self.matched_terms(prediction, BatchTargets.concatenate(targets), pairs, num_boxes, with_alignment)

    def matched_terms(
        self,
        prediction: Predictions,
        batch_targets: BatchTargets,
        pairs: MatchedPairs,
        num_boxes: float | Tensor,
        with_alignment: bool,
    ) -> dict[str, Tensor]:
        """:meth:`output_terms` of one output whose matched pairs are already on the device."""
        cfg = self.config
        logits, boxes = prediction.logits.float(), prediction.boxes.float()
        valid = prediction.valid
        onehot = one_hot_targets(logits, pairs, batch_targets)
        matched_boxes = boxes[pairs.image, pairs.slot]
        target_boxes = batch_targets.boxes[pairs.target].to(boxes)
        l1, giou = box_losses(matched_boxes, target_boxes, num_boxes)
        terms = {
            CLASS_TERM: focal_loss(logits, onehot, num_boxes, cfg.focal_alpha, cfg.focal_gamma, valid),
            BBOX_TERM: l1,
            GIOU_TERM: giou,
        }
        if with_alignment:
            matched_iou = torch.zeros(boxes.shape[:2], device=boxes.device)
            if pairs.slot.numel():
                iou = box_iou(cxcywh_to_xyxy(matched_boxes), cxcywh_to_xyxy(target_boxes)).diagonal()
                matched_iou[pairs.image, pairs.slot] = iou.detach()
            terms[ALIGN_TERM] = alignment_loss(
                logits, onehot, matched_iou, num_boxes, cfg.align_alpha, cfg.align_beta, cfg.align_gamma, valid
            )
        return terms

    def match_all(
        self, predictions: dict[str, Predictions], targets: list[dict[str, Tensor]]
    ) -> dict[str, list[Assignment]]:
        """The matcher's assignments of every output, with one device-to-host transfer per group of outputs
        of equal shape (normally all of them: decoder layers and the TAQ encoder output share [B, N, C])."""
        groups: dict[tuple[int, ...], list[str]] = {}
        for name, prediction in predictions.items():
            groups.setdefault(tuple(prediction.logits.shape), []).append(name)
        assignments: dict[str, list[Assignment]] = {}
        for names in groups.values():
            stack = [predictions[name] for name in names]
            valid = None
            if any(p.valid is not None for p in stack):
                valid = torch.stack(
                    [
                        p.valid if p.valid is not None else torch.ones_like(p.logits[..., 0], dtype=torch.bool)
                        for p in stack
                    ]
                )
            logits = torch.stack([p.logits.detach().float() for p in stack])
            boxes = torch.stack([p.boxes.detach().float() for p in stack])
            for name, assigned in zip(names, self.matcher.match_outputs(logits, boxes, targets, valid), strict=True):
                assignments[name] = assigned
        return assignments

    def weighted_sum(self, terms: dict[str, Tensor]) -> Tensor:
        """Combine one output's terms with the configured weights."""
        cfg = self.config
        weights = {
            CLASS_TERM: cfg.class_weight,
            BBOX_TERM: cfg.bbox_weight,
            GIOU_TERM: cfg.giou_weight,
            ALIGN_TERM: cfg.align_loss_weight,
        }
        return sum(weights[name] * value for name, value in terms.items())

    def forward(
        self,
        decoder_layers: list[Predictions],
        targets: list[dict[str, Tensor]],
        encoder: Predictions | None = None,
    ) -> LossOutput:
        """decoder_layers: predictions of each decoder layer, first to last; targets per image ``labels``
        [T] int64 and ``boxes`` [T, 4] normalized cxcywh; encoder: TAQ mini-detector output or None."""
        device = decoder_layers[-1].logits.device
        with torch.autocast(device_type=device.type, enabled=False):
            num_boxes = self.num_boxes(targets, device)
            with_alignment = self.config.align_loss_weight > 0
            count = len(decoder_layers)
            used = range(count) if self.config.aux_loss else [count - 1]
            outputs = {layer_key(i): (decoder_layers[i], with_alignment) for i in used}
            if encoder is not None:
                outputs[ENCODER_OUTPUT] = (encoder, False)
            assignments = self.match_all({name: prediction for name, (prediction, _) in outputs.items()}, targets)
            pairs = dict(zip(assignments, matched_pairs(list(assignments.values()), targets, device), strict=True))
            batch_targets = BatchTargets.concatenate(targets)
            total = torch.zeros((), device=device)
            per_output: dict[str, dict[str, Tensor]] = {}
            for name, (prediction, alignment) in outputs.items():
                terms = self.matched_terms(prediction, batch_targets, pairs[name], num_boxes, alignment)
                total = total + self.weighted_sum(terms)
                per_output[name] = {k: v.detach() for k, v in terms.items()}
        return LossOutput(total=total, per_output=per_output)
