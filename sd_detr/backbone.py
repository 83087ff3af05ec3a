"""ResNet backbone with frozen BatchNorm, returning the last feature map and its padding mask."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from sd_detr.backbone_weights import load_backbone_weights
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


def valid_image_sizes(padding_mask: Tensor) -> list[tuple[int, int]]:
    """(height, width) in pixels of each image's valid region: padding_mask [B, H, W] bool (True = padded).

    The valid region must be a non-empty top-left rectangle (how :mod:`sd_detr.data.collate` pads); anything
    else raises ``ValueError`` naming the image.
    """
    valid = ~padding_mask
    rows, cols = valid.any(dim=2), valid.any(dim=1)  # [B, H], [B, W]
    heights, widths = rows.sum(dim=1), cols.sum(dim=1)
    positions_h = torch.arange(rows.shape[1], device=rows.device)
    positions_w = torch.arange(cols.shape[1], device=cols.device)
    rectangle = (
        (rows == (positions_h[None] < heights[:, None])).all(dim=1)
        & (cols == (positions_w[None] < widths[:, None])).all(dim=1)
        & (valid.flatten(1).sum(dim=1) == heights * widths)
    )
    checks = torch.stack([heights, widths, rectangle.long()], dim=1).tolist()  # one device sync
    for index, (height, _, is_rectangle) in enumerate(checks):
        if height == 0:
            raise ValueError(f"padding_mask: image {index} has no valid pixel")
        if not is_rectangle:
            raise ValueError(f"padding_mask: image {index}'s valid pixels are not a top-left rectangle")
    return [(height, width) for height, width, _ in checks]


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
            load_backbone_weights(net, config)
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
        """images [B, 3, H, W] normalized, padding_mask [B, H, W] bool (True = padded; each image's valid
        pixels are the top-left rectangle) -> :class:`FeatureMap` of the batch's largest feature extent.

        Each image runs through the ResNet on its own unpadded crop (images of equal size together), so its
        features never see the padding or its batch companions: padding zeros would enter GroupNorm's
        statistics and the convolutions at the image border (docs/method.md 1.1). The feature maps are then
        zero-padded to the largest one, and each image's mask is exactly its own feature extent.
        """
        sizes = valid_image_sizes(padding_mask)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        outputs = {size: self._resnet(images[indices, :, : size[0], : size[1]]) for size, indices in groups.items()}
        height = max(out.shape[-2] for out in outputs.values())
        width = max(out.shape[-1] for out in outputs.values())
        first = next(iter(outputs.values()))
        features = first.new_zeros(len(sizes), first.shape[1], height, width)
        mask = torch.ones(len(sizes), height, width, dtype=torch.bool, device=images.device)
        for size, indices in groups.items():
            out = outputs[size]
            index = torch.as_tensor(indices, device=images.device)
            features[index, :, : out.shape[-2], : out.shape[-1]] = out
            mask[index, : out.shape[-2], : out.shape[-1]] = False
        return FeatureMap(features=features, padding_mask=mask)

    def _resnet(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (unpadded) -> C5 (or C4) features [B, C, ceil(H/s), ceil(W/s)]."""
        x = self.stem(images)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
