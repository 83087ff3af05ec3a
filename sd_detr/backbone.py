"""ResNet backbone with frozen BatchNorm, returning the last feature map and its padding mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from sd_detr.config import BackboneConfig

_STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")


@dataclass
class FeatureMap:
    """Backbone output: ``features`` [B, C, H/s, W/s] and ``padding_mask`` [B, H/s, W/s] (True = padded)."""

    features: Tensor
    padding_mask: Tensor


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups: batch-size independent normalization for training from scratch."""
    return nn.GroupNorm(32, num_channels)


class ResNetBackbone(nn.Module):
    """torchvision ResNet (18/34/50/101) with FrozenBatchNorm2d (or GroupNorm to train from scratch),
    stride 32 (or 16 with DC5 or C4 output).

    Stages beyond ``trainable_layers`` (counted from layer4 down to the stem) are frozen. Weights come only
    from ``weights_path`` (a local torchvision state_dict); nothing is downloaded.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        norm_layer = FrozenBatchNorm2d if config.norm == "frozen_batchnorm" else _group_norm
        net = getattr(resnet, config.name)(
            weights=None,
            norm_layer=norm_layer,
            replace_stride_with_dilation=[False, False, config.dilation],
        )
        if config.weights_path is not None:
            if not config.weights_path.is_file():
                raise FileNotFoundError(f"backbone.weights_path not found: {config.weights_path}")
            state = torch.load(config.weights_path, map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"backbone.weights_path {config.weights_path} does not fit {config.name}: "
                    f"missing {missing[:5]}, unexpected {unexpected[:5]}"
                )
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        use_c4 = config.feature_level == "c4"
        self.layer4 = nn.Identity() if use_c4 else net.layer4
        trainable = set(_STAGES[: config.trainable_layers])
        for name in _STAGES:
            for parameter in getattr(self, name).parameters():
                parameter.requires_grad_(name in trainable)
        self.num_channels: int = net.fc.in_features // 2 if use_c4 else net.fc.in_features
        self.stride: int = 16 if (config.dilation or use_c4) else 32

    def forward(self, images: Tensor, padding_mask: Tensor) -> FeatureMap:
        """images [B, 3, H, W] normalized, padding_mask [B, H, W] bool -> :class:`FeatureMap`."""
        x = self.stem(images)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        mask = F.interpolate(padding_mask[:, None].float(), size=x.shape[-2:]).to(torch.bool)[:, 0]
        return FeatureMap(features=x, padding_mask=mask)
