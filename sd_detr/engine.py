"""Framework-free training and inference steps shared by the demo, the Ray workers and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from sd_detr.config import DetectorConfig, OptimizerConfig
from sd_detr.losses import LossOutput, SetCriterion, mean_over_workers_identity
from sd_detr.matcher import HungarianMatcher
from sd_detr.model import Detector, DetectorOutput
from sd_detr.postprocess import postprocess


def build_criterion(
    config: DetectorConfig, average_across_workers: Callable[[Tensor], Tensor] = mean_over_workers_identity
) -> SetCriterion:
    """The set criterion of ``config`` (matcher costs + loss weights)."""
    return SetCriterion(HungarianMatcher(config.matcher), config.loss, average_across_workers)


def build_optimizer(model: Detector, config: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with the backbone at ``backbone_lr`` and everything else at ``lr``."""
    return torch.optim.AdamW(model.parameter_groups(config.lr, config.backbone_lr), weight_decay=config.weight_decay)


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
) -> tuple[DetectorOutput, LossOutput]:
    """Forward pass and set loss (the loss runs in fp32 even under autocast)."""
    outputs: DetectorOutput = model(images, padding_mask)
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
) -> LossOutput:
    """One optimisation step; raises ``FloatingPointError`` on a non-finite loss instead of training on."""
    model.train()
    with autocast_context(images.device, amp_dtype):
        _, losses = compute_loss(model, criterion, images, padding_mask, targets)
    if not torch.isfinite(losses.total):
        raise FloatingPointError(f"non-finite loss {float(losses.total)}: terms {losses.final_terms()}")
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
