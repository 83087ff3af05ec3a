"""Hugging Face transformers' ConditionalDetr built with our dimensions, and the backbone stand-ins that feed
it our backbone's features (``--scope transformer``) or our ResNet itself (``--scope full``)."""

from __future__ import annotations

import argparse
import copy

import torch
from step_models import Batch, Candidate, Inputs
from torch import Tensor, nn

from sd_detr.model import Detector


class PassThroughBackbone(nn.Module):
    """Stands in for HF's backbone: the "pixel values" are already backbone features [B, C, h, w] and the
    pixel mask the grid mask [B, h, w] (1 = valid), returned as HF's single feature level."""

    def forward(self, features: Tensor, valid_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(features, valid_mask.bool())]


class SharedResNet(nn.Module):
    """Stands in for HF's backbone with (a copy of) our torchvision ResNet; pixel mask 1 = valid."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = backbone

    def forward(self, images: Tensor, valid_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        feature_map = self.body(images, ~valid_mask.bool())
        return [(feature_map.features, ~feature_map.padding_mask)]


def build_hf(args: argparse.Namespace, ours: Detector) -> nn.Module:
    """HF ConditionalDetrForObjectDetection with our dimensions; its backbone replaced per ``--scope``."""
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

    t = ours.config.transformer
    channels = ours.backbone.num_channels
    config = ConditionalDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        backbone_config=ResNetConfig(depths=[1] * 4, hidden_sizes=[16, 16, 16, channels], embedding_size=16,
                                     out_features=["stage4"]),
        d_model=t.d_model, encoder_layers=t.num_encoder_layers, decoder_layers=t.num_decoder_layers,
        encoder_attention_heads=t.num_heads, decoder_attention_heads=t.num_heads,
        encoder_ffn_dim=t.ffn_dim, decoder_ffn_dim=t.ffn_dim,
        num_queries=ours.config.num_queries, num_labels=ours.config.num_classes, auxiliary_loss=True,
        dropout=t.dropout, attention_dropout=t.dropout, activation_dropout=t.dropout,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = ConditionalDetrForObjectDetection(config)
    model.model.backbone = PassThroughBackbone() if args.scope == "transformer" else SharedResNet(
        copy.deepcopy(ours.backbone)
    )  # fmt: skip
    return model


def hf_candidate(args: argparse.Namespace, ours: Detector, batch: Batch, device: torch.device) -> Candidate:
    """HF's model as the reference candidate: its own loss (``labels=``) and forward (pixel mask 1 = valid)."""
    model = build_hf(args, ours).to(device)

    def train_loss(inputs: Inputs) -> Tensor:
        return model(pixel_values=inputs[0], pixel_mask=(~inputs[1]).long(), labels=batch.hf_labels).loss

    def infer(inputs: Inputs):
        return model(pixel_values=inputs[0], pixel_mask=(~inputs[1]).long())

    return Candidate("hf ConditionalDetr", model, train_loss, infer, is_reference=True)
