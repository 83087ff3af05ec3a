"""The torchvision classification networks behind the backbones (ResNet, MobileNetV3, RegNet) with the configured
norm: frozen BatchNorm (ImageNet weights files) or GroupNorm (training from scratch)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn
from torchvision.models import mobilenetv3, regnet, resnet
from torchvision.ops.misc import FrozenBatchNorm2d

from sd_detr.config import BackboneConfig, backbone_family

_GROUPS = 32
"""GroupNorm's group count where it divides the channels (every ResNet width)."""

_BN_EPS = {"resnet": 1e-5, "regnet": 1e-5, "mobilenet": 1e-3}
"""BatchNorm eps of torchvision's own models per family: frozen BatchNorm keeps it so ImageNet files match."""


def group_norm_groups(num_channels: int) -> int:
    """Groups for ``num_channels``: 32 where 32 divides it (every ResNet width), else the largest divisor of
    ``num_channels`` below 32 (MobileNetV3 / RegNet widths such as 72 -> 24, 88 -> 22, 104 -> 26)."""
    return max(g for g in range(1, _GROUPS + 1) if num_channels % g == 0)


def _group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm (:func:`group_norm_groups` groups): batch-size independent normalization for training from
    scratch."""
    return nn.GroupNorm(group_norm_groups(num_channels), num_channels)


def norm_layer(config: BackboneConfig) -> Callable[[int], nn.Module]:
    """The norm every layer of the backbone gets: FrozenBatchNorm2d with the family's BatchNorm eps (so an
    ImageNet file computes what torchvision's model computes), or :func:`_group_norm`."""
    if config.norm == "group_norm":
        return _group_norm
    eps = _BN_EPS[backbone_family(config.name)]
    return FrozenBatchNorm2d if eps == 1e-5 else partial(FrozenBatchNorm2d, eps=eps)


def build_torchvision_net(config: BackboneConfig) -> nn.Module:
    """The full torchvision classification network of ``config.name`` (classifier included, random weights,
    the configured norm): the module a weights file with torchvision's key names loads into."""
    norm = norm_layer(config)
    name = config.name
    if name == "resnet10":  # shallow ResNet: basic blocks, one per stage
        return resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=norm)
    family = backbone_family(name)
    if family == "resnet":
        return getattr(resnet, name)(
            weights=None, norm_layer=norm, replace_stride_with_dilation=[False, False, config.dilation]
        )
    if family == "mobilenet":
        return getattr(mobilenetv3, name)(weights=None, norm_layer=norm)
    return getattr(regnet, name)(weights=None, norm_layer=norm)
