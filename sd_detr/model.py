"""The detector: backbone -> 1x1 projection -> encoder -> variant decoder (Conditional DETR or SD-DETR)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sd_detr.attention import ConditionalCrossAttention, DecoderSelfAttention, EncoderSelfAttention
from sd_detr.backbone import build_backbone
from sd_detr.conditional_decoder import ConditionalDetrDecoding
from sd_detr.config import ModelConfig
from sd_detr.heads import DecoderOutput, Predictions
from sd_detr.layers import TransformerEncoder
from sd_detr.position_encoding import SinePositionEmbedding2d


@dataclass
class DetectorOutput:
    """Detector output for a batch of B images with N slots and C classes.

    - ``logits`` [B, N, C], ``boxes`` [B, N, 4] normalized cxcywh: the last decoder layer.
    - ``aux``: the same for every earlier decoder layer (first to second-to-last).
    - ``encoder``: TAQ mini-detector predictions on its selected cells (``valid`` [B, N] marks the slots that
      are cells; fill slots of small images are not), or None.
    - ``memory`` [B, S, d] and ``memory_padding_mask`` [B, S]: encoder output; ``decoder`` holds the
      per-layer tensors (hidden states, reference points, extras such as attention inputs).
    """

    logits: Tensor
    boxes: Tensor
    aux: list[Predictions]
    encoder: Predictions | None
    memory: Tensor
    memory_padding_mask: Tensor
    decoder: DecoderOutput

    def final(self) -> Predictions:
        """The last decoder layer's predictions."""
        return Predictions(self.logits, self.boxes)

    def decoder_layers(self) -> list[Predictions]:
        """Every decoder layer's predictions, first to last."""
        return [*self.aux, self.final()]


class Detector(nn.Module):
    """DETR-style detector; ``config.variant`` picks the decoder, every other part is shared.

    Train/eval contract: input ``images`` [B, 3, H, W] ImageNet-normalized float and ``padding_mask``
    [B, H, W] bool (True = padded pixel; each image's valid pixels are its top-left rectangle); output
    :class:`DetectorOutput`. Boxes (predicted and target) are normalized cxcywh relative to each image's own
    unpadded extent, as in DETR, and fp32 under autocast. An image's output does not depend on the other
    images of its batch (within float noise): the backbone runs per image on its unpadded crop and
    everything after it masks padding (docs/method.md 1.1).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.transformer.d_model
        self.backbone = build_backbone(config.backbone)
        self.input_proj = nn.Conv2d(self.backbone.num_channels, d, kernel_size=1)
        self.position = SinePositionEmbedding2d(d)
        t = config.transformer
        self.encoder = TransformerEncoder(d, t.num_heads, t.ffn_dim, t.dropout, t.num_encoder_layers)
        match config.variant:
            case "conditional_detr":
                self.decoding: nn.Module = ConditionalDetrDecoding(config)
            case "sd_detr":
                from sd_detr.sd_decoder import SDDetrDecoding

                self.decoding = SDDetrDecoding(config)
        init_transformer_weights([self.encoder, *self.decoding.transformer_modules()])

    def forward(
        self, images: Tensor, padding_mask: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> DetectorOutput:
        """images [B, 3, H, W], padding_mask [B, H, W] bool (True = padded) -> :class:`DetectorOutput`.
        ``image_sizes``: each image's valid (h, w) px, read on the host (saves the backbone a device wait)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if padding_mask.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"padding_mask must be {(images.shape[0], *images.shape[-2:])}, got {tuple(padding_mask.shape)}"
            )
        feature_map = self.backbone(images, padding_mask, image_sizes)
        return self.forward_features(feature_map.features, feature_map.padding_mask)

    def forward_features(
        self, features: Tensor, padding_mask: Tensor, position: Tensor | None = None
    ) -> DetectorOutput:
        """Run everything after the backbone: features [B, C, h, w], padding_mask [B, h, w] (True = padded),
        optional position embedding [B, d, h, w] (computed from the mask when None)."""
        if position is None:
            position = self.position(padding_mask).to(features.dtype)
        spatial_shape = (features.shape[-2], features.shape[-1])
        x = self.input_proj(features).flatten(2).transpose(1, 2)
        memory_pos = position.flatten(2).transpose(1, 2)
        memory_mask = padding_mask.flatten(1)
        memory = self.encoder(x, memory_pos, memory_mask)
        decoded: DecoderOutput = self.decoding(memory, memory_pos, memory_mask, spatial_shape)
        aux = [Predictions(decoded.logits[i], decoded.boxes[i]) for i in range(decoded.logits.shape[0] - 1)]
        return DetectorOutput(
            logits=decoded.logits[-1],
            boxes=decoded.boxes[-1],
            aux=aux,
            encoder=decoded.encoder,
            memory=memory,
            memory_padding_mask=memory_mask,
            decoder=decoded,
        )

    def parameter_groups(self, lr: float, backbone_lr: float) -> list[dict]:
        """AdamW parameter groups: trainable backbone parameters at ``backbone_lr``, the rest at ``lr``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": rest, "lr": lr, "name": "transformer"}]
        if backbone:
            groups.append({"params": backbone, "lr": backbone_lr, "name": "backbone"})
        return groups


def init_transformer_weights(modules: Iterable[nn.Module]) -> None:
    """Official DETR / Conditional DETR initialisation of the transformer (docs/method.md 1.10).

    Every parameter with more than one dimension in ``modules`` is drawn xavier_uniform (official
    ``Transformer._reset_parameters``); the encoder self-attention's q, k, v weights as one packed [3d, d]
    matrix with zero biases, and every attention output projection with a zero bias, as
    ``nn.MultiheadAttention`` and Conditional DETR's decoder attention do. Other biases and the LayerNorms
    keep PyTorch's defaults, as in the official code. The heads, the learned query embeddings, the input
    projection and the backbone are not part of the transformer and keep their own initialisation.
    """
    for module in modules:
        for parameter in module.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for sub in module.modules():
            if isinstance(sub, EncoderSelfAttention):
                sub.reset_parameters_as_packed()
            elif isinstance(sub, (DecoderSelfAttention, ConditionalCrossAttention)):
                nn.init.zeros_(sub.out_proj.bias)


def build_detector(config: ModelConfig, seed: int | None = None) -> Detector:
    """Build a :class:`Detector` (optionally seeding its random initialisation)."""
    if seed is not None:
        torch.manual_seed(seed)
    return Detector(config)
