"""The models under test of `step_speed.py` (ours, built from its arguments) and their shared random batch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sd_detr.config import DetectorConfig
from sd_detr.engine import build_criterion, compile_transformer
from sd_detr.model import build_detector

Inputs = tuple[Tensor, Tensor]  # (features or images, padding mask True = padded)


def our_config(args: argparse.Namespace, variant: str, taq: bool) -> DetectorConfig:
    """Our detector config with the benchmark's dimensions (``--d-model``, ``--layers``, ...)."""
    return DetectorConfig.model_validate({
        "model": {
            "variant": variant, "num_classes": args.classes, "num_queries": args.queries,
            "backbone": {"name": args.backbone},
            "transformer": {
                "d_model": args.d_model, "num_heads": args.heads, "num_encoder_layers": args.layers,
                "num_decoder_layers": args.layers, "ffn_dim": args.ffn_dim or 8 * args.d_model,
                "dropout": args.dropout,
            },
        } | ({"taq": taq} if variant == "sd_detr" else {}),  # the baseline has no TAQ switch
    })  # fmt: skip


def transformer_parameters(model: nn.Module) -> int:
    """Trainable parameters outside the backbone."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "backbone" not in n)


@dataclass
class Batch:
    images: Tensor  # [B, 3, H, W]
    padding_mask: Tensor  # [B, H, W] True = padded
    features: Tensor  # [B, C, h, w] from our backbone
    grid_mask: Tensor  # [B, h, w] True = padded
    targets: list[dict[str, Tensor]]  # ours: labels, boxes normalized cxcywh
    hf_labels: list[dict[str, Tensor]]  # HF: class_labels, boxes


def make_batch(args: argparse.Namespace, backbone: nn.Module, device: torch.device) -> Batch:
    """Random images (the last one padded on the right by a quarter) and random boxes."""
    generator = torch.Generator().manual_seed(args.seed)
    size = args.image_size
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    padding_mask = torch.zeros(args.batch, size, size, dtype=torch.bool)
    padding_mask[-1, :, size - size // 4 :] = True
    images[padding_mask[:, None].expand_as(images)] = 0
    targets = []
    for _ in range(args.batch):
        centers = torch.rand(args.objects, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(args.objects, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, args.classes, (args.objects,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centers, sizes], 1).to(device)})
    images, padding_mask = images.to(device), padding_mask.to(device)
    with torch.no_grad():
        feature_map = backbone(images, padding_mask)
    return Batch(
        images=images,
        padding_mask=padding_mask,
        features=feature_map.features,
        grid_mask=feature_map.padding_mask,
        targets=targets,
        hf_labels=[{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets],
    )


@dataclass
class Candidate:
    """A model under test: ``train_loss(inputs)`` -> scalar loss, ``infer(inputs)`` -> outputs."""

    name: str
    model: nn.Module
    train_loss: Callable[[Inputs], Tensor]
    infer: Callable[[Inputs], object]
    is_reference: bool = False


def our_candidate(
    name: str, config: DetectorConfig, batch: Batch, scope: str, device: torch.device, compile: bool = False
) -> Candidate:
    """Our detector of ``config`` with its set criterion; ``compile``: its transformer ``torch.compile``'d
    (:func:`sd_detr.engine.compile_transformer`)."""
    model = build_detector(config.model, seed=0).to(device)
    if compile:
        compile_transformer(model)
    criterion = build_criterion(config)

    def forward(inputs: Inputs):
        return model.forward_features(*inputs) if scope == "transformer" else model(*inputs)

    def train_loss(inputs: Inputs) -> Tensor:
        outputs = forward(inputs)
        return criterion(outputs.decoder_layers(), batch.targets, outputs.encoder).total

    return Candidate(name, model, train_loss, forward)
