"""Backbones (torchvision ResNet, MobileNetV3, RegNet) with frozen BatchNorm or GroupNorm, returning the last
feature map and its padding mask."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sd_detr.backbone_nets import build_torchvision_net
from sd_detr.backbone_weights import load_backbone_weights
from sd_detr.config import BackboneConfig, backbone_family


@dataclass
class FeatureMap:
    """Backbone output: ``features`` [B, C, H/s, W/s] and ``padding_mask`` [B, H/s, W/s] (True = padded)."""

    features: Tensor
    padding_mask: Tensor


_STAGES = ("layer4", "layer3", "layer2", "layer1", "stem")


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


def _checked_sizes(image_sizes: Sequence[tuple[int, int]], images: Tensor) -> list[tuple[int, int]]:
    """``image_sizes`` as (int, int) pairs, one per image of ``images`` [B, 3, H, W], each within 1..H x 1..W."""
    height, width = images.shape[-2:]
    sizes = [(int(h), int(w)) for h, w in image_sizes]
    if len(sizes) != images.shape[0] or not all(0 < h <= height and 0 < w <= width for h, w in sizes):
        raise ValueError(f"image_sizes {sizes} do not fit a batch of {images.shape[0]} images of {height}x{width}")
    return sizes


def _block_stride(block: nn.Module) -> int:
    """Spatial stride of one feature block: the product of its strided convolutions' strides along a path
    (the largest stride of any one conv: torchvision's blocks downsample at most once)."""
    strides = [m.stride[0] for m in block.modules() if isinstance(m, nn.Conv2d)]
    return max(strides, default=1)


def _last_out_channels(module: nn.Module) -> int:
    """Output channels of ``module``'s last convolution (in registration order, which is execution order
    for torchvision's MobileNetV3 and RegNet blocks: the projection conv comes after the SE convs)."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


class Backbone(nn.Module):
    """A feature trunk split into five units ``stem``, ``layer1`` (stride 4), ``layer2`` (8), ``layer3`` (16),
    ``layer4`` (32), of which ``trainable_layers`` train (counted from layer4 down to the stem; the rest are
    frozen). ``feature_level: c4`` drops ``layer4`` (stride 16), ``c3`` also ``layer3`` (stride 8). Exposes
    ``num_channels`` and ``stride``.

    Weights come only from ``weights_path`` (a local torchvision state_dict of the family); nothing is
    downloaded. Subclasses fill the five units from a torchvision network.
    """

    num_channels: int
    stride: int

    def _finish(self, config: BackboneConfig, c3_channels: int, c4_channels: int, c5_channels: int) -> None:
        """Drop the units above ``feature_level`` (layer4 for C4, layer3 and layer4 for C3), freeze the units
        beyond ``trainable_layers``, set ``num_channels``/``stride``."""
        level = config.feature_level
        if level in ("c3", "c4"):
            self.layer4 = nn.Identity()
        if level == "c3":
            self.layer3 = nn.Identity()
        trainable = set(_STAGES[: config.trainable_layers])
        for name in _STAGES:
            for parameter in getattr(self, name).parameters():
                parameter.requires_grad_(name in trainable)
        self.num_channels = {"c3": c3_channels, "c4": c4_channels, "c5": c5_channels}[level]
        self.stride = {"c3": 8, "c4": 16, "c5": 16 if config.dilation else 32}[level]

    def forward(
        self, images: Tensor, padding_mask: Tensor, image_sizes: Sequence[tuple[int, int]] | None = None
    ) -> FeatureMap:
        """images [B, 3, H, W] normalized, padding_mask [B, H, W] bool (True = padded; each image's valid
        pixels are the top-left rectangle) -> :class:`FeatureMap` of the batch's largest feature extent.

        ``image_sizes`` (optional): each image's valid (height, width) in pixels, i.e.
        :func:`valid_image_sizes` of the mask, computed by the caller where the mask is still on the host. Without
        it they are read from ``padding_mask``, which on a GPU waits for the device once.

        Each image runs through the trunk on its own unpadded crop (images of equal size together), so its
        features never see the padding or its batch companions: padding zeros would enter GroupNorm's
        statistics and the convolutions at the image border (docs/method.md 1.1). The feature maps are then
        zero-padded to the largest one, and each image's mask is exactly its own feature extent.
        """
        sizes = valid_image_sizes(padding_mask) if image_sizes is None else _checked_sizes(image_sizes, images)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        outputs = {size: self._trunk(images[indices, :, : size[0], : size[1]]) for size, indices in groups.items()}
        height = max(out.shape[-2] for out in outputs.values())
        width = max(out.shape[-1] for out in outputs.values())
        first = next(iter(outputs.values()))
        features = first.new_zeros(len(sizes), first.shape[1], height, width)
        mask = torch.ones(len(sizes), height, width, dtype=torch.bool, device=images.device)
        for size, indices in groups.items():
            out = outputs[size]
            index = torch.as_tensor(indices).to(images.device, non_blocking=True)  # no wait for the device
            features[index, :, : out.shape[-2], : out.shape[-1]] = out
            mask[index, : out.shape[-2], : out.shape[-1]] = False
        return FeatureMap(features=features, padding_mask=mask)

    def _trunk(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (unpadded) -> C5 (or C4) features [B, C, ceil(H/s), ceil(W/s)]."""
        x = self.stem(images)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNetBackbone(Backbone):
    """torchvision ResNet (10/18/34/50/101; ResNet-10 is torchvision's ``ResNet`` with basic blocks [1, 1, 1, 1])
    with FrozenBatchNorm2d (or GroupNorm to train from scratch), stride 32 (or 16 with DC5 or C4 output).

    Units: stem = conv1, bn1, relu, maxpool; layer1..layer4 = torchvision's stages.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        if backbone_family(config.name) != "resnet":
            raise ValueError(f"ResNetBackbone needs a ResNet; model.backbone.name={config.name} (use build_backbone)")
        net = build_torchvision_net(config)
        if config.weights_path is not None:
            load_backbone_weights(net, config)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self._finish(config, net.fc.in_features // 4, net.fc.in_features // 2, net.fc.in_features)


class MobileNetV3Backbone(Backbone):
    """torchvision MobileNetV3 (small / large) ``features``, split by stride into the five units.

    Units: stem = the first conv (and blocks still at stride 2); layer1..layer4 = the blocks whose output is
    at stride 4 / 8 / 16 / 32, layer4 ending with the final 1x1 conv (576 channels small, 960 large). C4 is the
    last block at stride 16 (48 channels small, 112 large). Stride 16 with DC5 is not offered.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        net = build_torchvision_net(config)
        if config.weights_path is not None:
            load_backbone_weights(net, config)
        units: list[list[nn.Module]] = [[], [], [], [], []]
        stride = 1
        for block in net.features:
            stride *= _block_stride(block)
            units[int(math.log2(stride)) - 1].append(block)
        self.stem, self.layer1, self.layer2, self.layer3, self.layer4 = (nn.Sequential(*unit) for unit in units)
        self._finish(
            config, _last_out_channels(self.layer2), _last_out_channels(self.layer3), _last_out_channels(self.layer4)
        )


class RegNetBackbone(Backbone):
    """torchvision RegNet (X / Y 400MF): stem = ``stem`` (stride 2), layer1..layer4 = ``trunk_output``'s
    block1..block4 (stride 4 / 8 / 16 / 32). C4 = block3's output."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        net = build_torchvision_net(config)
        if config.weights_path is not None:
            load_backbone_weights(net, config)
        trunk = net.trunk_output
        self.stem = net.stem
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.block1, trunk.block2, trunk.block3, trunk.block4
        self._finish(config, _last_out_channels(self.layer2), _last_out_channels(self.layer3), net.fc.in_features)


def build_backbone(config: BackboneConfig) -> Backbone:
    """The backbone module for ``config.name`` (see :class:`Backbone` for the shared interface)."""
    family = backbone_family(config.name)
    if family == "resnet":
        return ResNetBackbone(config)
    if family == "mobilenet":
        return MobileNetV3Backbone(config)
    return RegNetBackbone(config)
