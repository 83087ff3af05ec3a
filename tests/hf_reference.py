"""Build Hugging Face transformers' ConditionalDetr offline and copy its weights into our detector."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

from sd_detr.config import ModelConfig
from sd_detr.model import Detector


def build_hf_model(config: ModelConfig, backbone_channels: int, seed: int) -> ConditionalDetrForObjectDetection:
    """Random-init HF ConditionalDetr with our dimensions; every parameter perturbed so no bias is 0/1."""
    t = config.transformer
    hf_config = ConditionalDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        backbone_config=ResNetConfig(
            depths=[1, 1, 1, 1],
            hidden_sizes=[16, 16, 16, backbone_channels],
            embedding_size=16,
            out_features=["stage4"],
        ),
        d_model=t.d_model,
        encoder_layers=t.num_encoder_layers,
        decoder_layers=t.num_decoder_layers,
        encoder_attention_heads=t.num_heads,
        decoder_attention_heads=t.num_heads,
        encoder_ffn_dim=t.ffn_dim,
        decoder_ffn_dim=t.ffn_dim,
        num_queries=config.num_queries,
        num_labels=config.num_classes,
        auxiliary_loss=False,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = ConditionalDetrForObjectDetection(hf_config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


_RENAMES = [
    (r"^model\.input_projection\.", "input_proj."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.o_proj\.", r"encoder.layers.\1.self_attn.out_proj."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder.layers.\1.self_attn."),
    (r"^model\.encoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.layers.\1.norm."),
    (r"^model\.encoder\.layers\.(\d+)\.mlp\.", r"encoder.layers.\1.ffn."),
    (r"^model\.encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.ffn.norm."),
    (r"^model\.query_position_embeddings\.", "decoding.query_pos."),
    (r"^model\.decoder\.ref_point_head\.", "decoding.ref_point_head."),
    (r"^model\.decoder\.query_scale\.", "decoding.decoder.query_scale."),
    (r"^model\.decoder\.layernorm\.", "decoding.decoder.norm."),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn\.o_proj\.",
        r"decoding.decoder.layers.\1.self_block.attn.out_proj.",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.self_attn\.", r"decoding.decoder.layers.\1.self_block.attn."),
    (
        r"^model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.",
        r"decoding.decoder.layers.\1.self_block.norm.",
    ),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.o_proj\.",
        r"decoding.decoder.layers.\1.cross_block.attn.out_proj.",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.encoder_attn\.", r"decoding.decoder.layers.\1.cross_block.attn."),
    (
        r"^model\.decoder\.layers\.(\d+)\.encoder_attn_layer_norm\.",
        r"decoding.decoder.layers.\1.cross_block.norm.",
    ),
    (r"^model\.decoder\.layers\.(\d+)\.mlp\.", r"decoding.decoder.layers.\1.cross_block.ffn."),
    (
        r"^model\.decoder\.layers\.(\d+)\.final_layer_norm\.",
        r"decoding.decoder.layers.\1.cross_block.ffn.norm.",
    ),
    (r"^class_labels_classifier\.", "decoding.heads.class_head."),
    (r"^bbox_predictor\.", "decoding.heads.box_head."),
]


def our_name(hf_name: str) -> str | None:
    """Our parameter name for an HF ConditionalDetr parameter (None for its backbone)."""
    if hf_name.startswith("model.backbone.") or hf_name.startswith("model.position_embedding"):
        return None
    for pattern, replacement in _RENAMES:
        if re.match(pattern, hf_name):
            return re.sub(pattern, replacement, hf_name)
    raise KeyError(f"no mapping for HF parameter {hf_name}")


def copy_hf_weights(hf_model: nn.Module, ours: Detector) -> None:
    """Copy every non-backbone HF parameter into ``ours``; fail if any of ours is left uncovered."""
    our_state = ours.state_dict()
    covered = set()
    with torch.no_grad():
        for hf_name, value in hf_model.state_dict().items():
            name = our_name(hf_name)
            if name is None:
                continue
            if name not in our_state:
                raise KeyError(f"{hf_name} -> {name} is not a parameter of ours")
            if our_state[name].shape != value.shape:
                raise ValueError(f"{hf_name} {tuple(value.shape)} vs {name} {tuple(our_state[name].shape)}")
            our_state[name].copy_(value)
            covered.add(name)
    uncovered = [n for n in our_state if n not in covered and not n.startswith("backbone.")]
    if uncovered:
        raise KeyError(f"our parameters not set from HF: {uncovered}")
