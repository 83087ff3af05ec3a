"""Framework-free training and inference steps shared by the demo, the Ray workers and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from sd_detr.config import DetectorConfig, OptimizerConfig
from sd_detr.losses import LossOutput, SetCriterion, mean_over_workers_identity
from sd_detr.matcher import HungarianMatcher
from sd_detr.model import Detector, DetectorOutput
from sd_detr.names import LOSS_TERMS, loss_metric
from sd_detr.postprocess import postprocess


def build_criterion(
    config: DetectorConfig, average_across_workers: Callable[[Tensor], Tensor] = mean_over_workers_identity
) -> SetCriterion:
    """The set criterion of ``config`` (matcher costs + loss weights)."""
    return SetCriterion(HungarianMatcher(config.matcher), config.loss, average_across_workers)


def build_optimizer(model: Detector, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with the backbone at ``backbone_lr`` and everything else at ``lr``.

    The fused implementation (one kernel over all parameters, on CPU and CUDA) gives the same update as the
    per-parameter loop up to float rounding, at a fraction of its cost (docs/benchmarks.md, "Optimizer step").
    """
    return torch.optim.AdamW(
        model.parameter_groups(config.lr, config.backbone_lr), weight_decay=config.weight_decay, fused=True
    )


def compile_transformer(model: Detector) -> Detector:
    """Compile ``model``'s encoder and decoding (queries, decoder, heads) in place with ``torch.compile``
    (TorchInductor, ``dynamic=True``: batch size and feature-map size vary from step to step without
    recompiling); returns ``model``.

    The backbone stays eager: it runs per image size (a host-side grouping that would break the graph) and
    its convolutions are library kernels already. In-place compilation keeps the module tree, so parameter
    names, checkpoints, DDP wrapping and ``parameter_groups`` are unchanged; a graph break falls back to eager
    for that part. The first steps are slow (compilation).
    """
    model.encoder.compile(dynamic=True)
    model.decoding.compile(dynamic=True)
    return model


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, config: OptimizerConfig
) -> torch.optim.lr_scheduler.LRScheduler:
    """Step schedule: lr multiplied by ``lr_drop_factor`` at each epoch of ``lr_drop_epochs`` (step per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, config.lr_drop_epochs, gamma=config.lr_drop_factor)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> object:
    """bf16/fp16 autocast on CUDA when ``dtype`` is given; a no-op on CPU (AMP is CUDA-only here)."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return nullcontext()


def compute_loss(
    model: nn.Module,
    criterion: SetCriterion,
    images: Tensor,
    padding_mask: Tensor,
    targets: list[dict[str, Tensor]],
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> tuple[DetectorOutput, LossOutput]:
    """Forward pass and set loss (the loss runs in fp32 even under autocast). ``image_sizes``: see
    :meth:`sd_detr.backbone.Backbone.forward`."""
    outputs: DetectorOutput = model(images, padding_mask, image_sizes)
    return outputs, criterion(outputs.decoder_layers(), targets, outputs.encoder)


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    padding_mask: Tensor,
    targets: list[dict[str, Tensor]],
    grad_clip_norm: float = 0.0,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    image_sizes: Sequence[tuple[int, int]] | None = None,
) -> LossOutput:
    """One optimisation step (forward, loss, backward, optional clipping, optimizer step) that never waits for the
    device except for the matcher's one device-to-host transfer (docs/method.md 1.7) when ``image_sizes`` (each
    image's valid (h, w), :func:`sd_detr.backbone.valid_image_sizes` of the host mask) is given; without it the
    backbone reads them from the mask, one more wait on a GPU. It does not check the loss
    for NaN/inf (that would be another wait per step): :class:`LossMeter` does, at each of its reads. With a
    ``scaler`` (fp16), ``GradScaler.step`` reads its inf/NaN flag on the host every step.
    """
    model.train()
    with autocast_context(images.device, amp_dtype):
        _, losses = compute_loss(model, criterion, images, padding_mask, targets, image_sizes)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(losses.total).backward()
        scaler.unscale_(optimizer)
    else:
        losses.total.backward()
    if grad_clip_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return losses


class LossMeter:
    """Running sums over training steps of the weighted total loss and the last decoder layer's unweighted terms,
    kept on the device in float64: :meth:`add` costs no host-device synchronisation, :meth:`read` one transfer.

    :meth:`read` also checks the loss: a NaN or inf in any step since the last read leaves the sum non-finite,
    and it raises ``FloatingPointError``. The check thus costs no synchronisation of its own; a non-finite step
    is caught at the caller's next read instead of before its optimizer step. Keys: ``loss`` and
    ``loss_<term>`` for every term of :data:`sd_detr.names.LOSS_TERMS` (0 for a term the model lacks).
    """

    def __init__(self, device: torch.device) -> None:
        self.names = [loss_metric(), *(loss_metric(term) for term in LOSS_TERMS)]
        self.sums = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.steps = 0
        self.checked_steps = 0

    def add(self, losses: LossOutput) -> None:
        """Add one step's ``losses.total`` and final-layer terms (device-side, no wait)."""
        terms = losses.final_terms()
        zero = torch.zeros((), device=self.sums.device)
        values = [losses.total.detach(), *(terms.get(term, zero) for term in LOSS_TERMS)]
        self.sums += torch.stack([value.float() for value in values]).double()
        self.steps += 1

    def read(self) -> dict[str, float]:
        """The sums on the host (one transfer); raises ``FloatingPointError`` when one is not finite."""
        values = dict(zip(self.names, self.sums.tolist(), strict=True))
        if not all(math.isfinite(value) for value in values.values()):
            raise FloatingPointError(
                f"non-finite loss in training steps {self.checked_steps + 1}..{self.steps}: sums {values}"
            )
        self.checked_steps = self.steps
        return values


@torch.no_grad()
def predict(
    model: nn.Module,
    images: Tensor,
    padding_mask: Tensor,
    orig_sizes: Tensor,
    label_to_category_id: Tensor | None = None,
    top_k: int = 100,
    amp_dtype: torch.dtype | None = None,
) -> list[dict[str, Tensor]]:
    """Detections per image (``scores``, ``labels``, ``boxes`` xyxy in original pixels), model in eval mode."""
    was_training = model.training
    model.eval()
    with autocast_context(images.device, amp_dtype):
        outputs: DetectorOutput = model(images, padding_mask)
    model.train(was_training)
    return postprocess(outputs.logits, outputs.boxes, orig_sizes, top_k, label_to_category_id)
