"""Prediction heads shared by both decoder variants and the output dataclasses of the detector."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from sd_detr.box_ops import full_precision, inverse_sigmoid
from sd_detr.layers import MLP


@dataclass
class Predictions:
    """One set of predictions: ``logits`` [B, N, C] (sigmoid scores, no background class) and
    ``boxes`` [B, N, 4] normalized cxcywh in [0, 1]; ``valid`` [B, N] bool or None (= all valid).

    Slots with ``valid`` False are not predictions at all (TAQ's encoder output on an image with fewer
    memory cells than slots, docs/method.md 2.2): the matcher never assigns them and the criterion gives
    them no loss.
    """

    logits: Tensor
    boxes: Tensor
    valid: Tensor | None = None


@dataclass
class DecoderOutput:
    """Per-layer predictions of a decoder: ``logits`` [L, B, N, C], ``boxes`` [L, B, N, 4],
    ``hidden`` [L, B, N, d] (the class stream's features for SD-DETR), ``reference`` [B, N, 2 or 4]
    normalized; ``encoder`` holds the TAQ mini-detector's predictions on its selected cells (or None)."""

    logits: Tensor
    boxes: Tensor
    hidden: Tensor
    reference: Tensor
    encoder: Predictions | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


class PredictionHeads(nn.Module):
    """Class head (Linear, focal prior bias) and box head (3-layer MLP refining a reference box).

    The box head predicts logit-space offsets; the reference's coordinates (center, or the whole box when
    the reference is 4-d) are added to them before the sigmoid. Initialisation as official Conditional
    DETR (docs/method.md 1.10): class bias -log((1 - p) / p), last box layer zero, so every slot starts at
    score p and at its reference box.
    """

    def __init__(self, d_model: int, num_classes: int, class_prior_prob: float) -> None:
        super().__init__()
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = MLP(d_model, d_model, 4, 3)
        nn.init.constant_(self.class_head.bias, -math.log((1 - class_prior_prob) / class_prior_prob))
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)

    def classify(self, hidden: Tensor) -> Tensor:
        """hidden [..., N, d] -> logits [..., N, C]."""
        return self.class_head(hidden)

    def regress(self, hidden: Tensor, reference: Tensor) -> Tensor:
        """hidden [..., N, d], reference [B, N, 2 or 4] normalized -> boxes [..., N, 4] normalized cxcywh, fp32.

        The box MLP, the reference logit and the sigmoid run in fp32 with autocast off (docs/method.md 1.11):
        bf16 would round the box coordinates by up to ~4 px at 1333 px.
        """
        with full_precision(hidden.device):
            offsets = self.box_head(hidden.float())
            reference_logit = F.pad(inverse_sigmoid(reference.float()), (0, 4 - reference.shape[-1]))
            return (offsets + reference_logit).sigmoid()


def check_memory(memory: Tensor, memory_pos: Tensor, memory_padding_mask: Tensor | None) -> None:
    """Raise a clear error when the encoder memory, its position embedding and mask disagree in shape."""
    if memory.shape != memory_pos.shape:
        raise ValueError(f"memory {tuple(memory.shape)} and memory_pos {tuple(memory_pos.shape)} differ")
    if memory_padding_mask is not None and memory_padding_mask.shape != memory.shape[:2]:
        raise ValueError(f"memory_padding_mask {tuple(memory_padding_mask.shape)} must be {tuple(memory.shape[:2])}")
