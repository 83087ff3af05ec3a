"""Small-compute backbones (ResNet-10, MobileNetV3 small/large, RegNet X/Y 400MF) behind ``model.backbone``:
channels and strides, each image's feature extent, batch independence of the per-image forward, a Detector
that trains a step and predicts, torchvision weights files loading exactly, and clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from sd_detr.backbone import Backbone, build_backbone
from sd_detr.backbone_nets import build_torchvision_net, group_norm_groups
from sd_detr.backbone_weights import BackboneWeightsError, check_backbone_weights, load_backbone_weights
from sd_detr.config import BackboneConfig, DetectorConfig, OptimizerConfig
from sd_detr.engine import build_criterion, build_optimizer, compute_loss, predict
from sd_detr.model import build_detector
from tests.test_real_sizes import pad_batch, random_image, targets_for

SMALL = ["resnet10", "mobilenet_v3_small", "mobilenet_v3_large", "regnet_x_400mf", "regnet_y_400mf"]
CHANNELS = {  # output channels of C3, C4, C5 (torchvision's architectures)
    "resnet10": {"c3": 128, "c4": 256, "c5": 512},
    "mobilenet_v3_small": {"c3": 24, "c4": 48, "c5": 576},
    "mobilenet_v3_large": {"c3": 40, "c4": 112, "c5": 960},
    "regnet_x_400mf": {"c3": 64, "c4": 160, "c5": 400},
    "regnet_y_400mf": {"c3": 104, "c4": 208, "c5": 440},
}
SIZES = [(128, 160), (97, 131)]


def _scratch(name: str, **overrides: object) -> Backbone:
    torch.manual_seed(0)
    config = {"name": name, "norm": "group_norm", "trainable_layers": 5, "pretrained": False, **overrides}
    return build_backbone(BackboneConfig.model_validate(config))


@pytest.mark.parametrize("level", ["c5", "c4", "c3"])
@pytest.mark.parametrize("name", SMALL)
def test_channels_stride_and_each_images_feature_extent(name: str, level: str) -> None:
    backbone = _scratch(name, feature_level=level).eval()
    stride = {"c5": 32, "c4": 16, "c3": 8}[level]
    assert backbone.stride == stride and backbone.num_channels == CHANNELS[name][level]
    dropped = {"c5": [], "c4": ["layer4"], "c3": ["layer3", "layer4"]}[level]
    assert [unit for unit in ("layer3", "layer4") if isinstance(getattr(backbone, unit), nn.Identity)] == dropped
    images, mask = pad_batch([random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)])
    with torch.no_grad():
        out = backbone(images, mask)
    extents = [(math.ceil(h / stride), math.ceil(w / stride)) for h, w in SIZES]
    assert out.features.shape == (2, backbone.num_channels, *extents[0])
    for index, (h, w) in enumerate(extents):
        m = out.padding_mask[index]
        assert not m[:h, :w].any() and int(m.sum()) == m.numel() - h * w
        assert not out.features[index][:, m].any()  # padded cells are zero
        assert out.features[index, :, :h, :w].abs().sum() > 0


@pytest.mark.parametrize("name", SMALL)
def test_an_image_alone_and_beside_a_larger_one_gets_the_same_features(name: str) -> None:
    backbone = _scratch(name, feature_level="c4").eval()
    small, large = random_image(97, 131, 0), random_image(128, 160, 1)
    with torch.no_grad():
        alone = backbone(*pad_batch([small]))
        company = backbone(*pad_batch([large, small]))
    h, w = alone.features.shape[-2:]
    torch.testing.assert_close(company.features[1, :, :h, :w], alone.features[0], atol=1e-5, rtol=1e-5)
    assert company.padding_mask[1, h:].all() and company.padding_mask[1, :, w:].all()


@pytest.mark.parametrize("name", SMALL)
def test_units_have_the_documented_strides_and_trainable_layers_counts_from_layer4(name: str) -> None:
    backbone = _scratch(name, trainable_layers=2, norm="frozen_batchnorm", pretrained=True)
    x = torch.zeros(1, 3, 64, 64)
    strides = []
    with torch.no_grad():
        for unit in ("stem", "layer1", "layer2", "layer3", "layer4"):
            x = getattr(backbone, unit)(x)
            strides.append(64 // x.shape[-1])
    assert strides[1:] == [4, 8, 16, 32] and strides[0] in (2, 4)  # ResNet's stem includes the max-pool
    for unit, trains in (("stem", False), ("layer1", False), ("layer2", False), ("layer3", True), ("layer4", True)):
        flags = {p.requires_grad for p in getattr(backbone, unit).parameters()}
        assert flags == {trains}, (unit, flags)


def test_group_norm_groups_divide_every_width() -> None:
    assert [group_norm_groups(c) for c in (64, 512, 72, 88, 104, 440, 16, 24)] == [32, 32, 24, 22, 26, 22, 16, 24]
    for name in SMALL:
        for module in _scratch(name).modules():
            if isinstance(module, nn.GroupNorm):
                assert module.num_channels % module.num_groups == 0
            assert not isinstance(module, nn.BatchNorm2d)


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL)
def test_a_detector_with_it_trains_a_step_and_predicts(name: str) -> None:
    level = {"resnet": "c3", "mobilenet": "c5", "regnet": "c4"}[name.split("_")[0].rstrip("0123456789")]
    config = DetectorConfig.model_validate(
        {
            "model": {
                "variant": "sd_detr",
                "num_classes": 80,
                "num_queries": 30,
                "backbone": {"name": name, "feature_level": level, "norm": "group_norm", "trainable_layers": 5},
                "transformer": {
                    "d_model": 32,
                    "num_heads": 4,
                    "num_encoder_layers": 1,
                    "num_decoder_layers": 2,
                    "ffn_dim": 64,
                    "dropout": 0.0,
                },
            }
        }
    )
    model = build_detector(config.model, seed=0)
    criterion = build_criterion(config)
    sizes = [(64, 80), (49, 65)]  # small: a step on a shared CPU stays short
    images, mask = pad_batch([random_image(h, w, seed) for seed, (h, w) in enumerate(sizes)])
    model.train()
    _, losses = compute_loss(model, criterion, images, mask, targets_for(2, seed=1))
    assert torch.isfinite(losses.total)
    losses.total.backward()
    for unit in ("stem", "layer1", {"c5": "layer4", "c4": "layer3", "c3": "layer2"}[level]):
        grads = [p.grad for p in getattr(model.backbone, unit).parameters()]
        assert grads and all(g is not None for g in grads), unit
        assert sum(g.abs().sum() for g in grads) > 0, unit
    before = {name: p.detach().clone() for name, p in model.backbone.named_parameters()}
    build_optimizer(model, OptimizerConfig()).step()  # the job's AdamW, backbone group included
    assert all(not torch.equal(p, before[name]) for name, p in model.backbone.named_parameters()), "not stepped"
    detections = predict(model, images, mask, torch.tensor(sizes))
    assert len(detections) == 2 and all(torch.isfinite(d["boxes"]).all() for d in detections)


def _torchvision_model(name: str) -> nn.Module:
    """torchvision's own model of the family (ImageNet BatchNorm), eval mode: what a weights file comes from."""
    if name == "resnet10":
        return torchvision.models.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1]).eval()
    return getattr(torchvision.models, name)(weights=None).eval()


def _torchvision_c5(net: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    if name.startswith("resnet"):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))
    if name.startswith("mobilenet"):
        return net.features(x)
    return net.trunk_output(net.stem(x))


@pytest.mark.parametrize("name", SMALL)
def test_weights_from_torchvisions_own_model_load_exactly(name: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = _torchvision_model(name)
    with torch.no_grad():  # perturbed: a load that kept the random init or skipped BN statistics is caught
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.add_(torch.randn_like(module.running_mean) * 0.1)
                module.running_var.mul_(torch.rand_like(module.running_var) + 0.5)
                module.weight.add_(torch.randn_like(module.weight) * 0.1)
    path = tmp_path / f"{name}.pth"
    torch.save(net.state_dict(), path)
    config = BackboneConfig(name=name, weights_path=path, trainable_layers=0)
    check_backbone_weights(config)
    backbone = build_backbone(config).eval()
    image = random_image(97, 131, 3)
    with torch.no_grad():
        ours = backbone(image[None], torch.zeros(1, 97, 131, dtype=torch.bool)).features
        theirs = _torchvision_c5(net, name, image[None])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    loaded = build_torchvision_net(config)
    load_backbone_weights(loaded, config)
    state = loaded.state_dict()
    for key, value in net.state_dict().items():
        if not key.startswith(("fc.", "classifier.")) and not key.endswith("num_batches_tracked"):
            assert torch.equal(state[key], value), key


def test_weights_of_another_family_or_for_group_norm_fail_clearly(tmp_path: Path) -> None:
    path = tmp_path / "mobilenet_v3_small.pth"
    torch.save(_torchvision_model("mobilenet_v3_small").state_dict(), path)
    for check in (check_backbone_weights, build_backbone):
        with pytest.raises(BackboneWeightsError, match=r"does not fit a torchvision regnet_x_400mf.*missing keys"):
            check(BackboneConfig(name="regnet_x_400mf", weights_path=path))
        with pytest.raises(BackboneWeightsError, match=r"BatchNorm statistics.*norm=group_norm"):
            check(BackboneConfig(name="mobilenet_v3_small", norm="group_norm", weights_path=path))
    resnet18 = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), resnet18)
    with pytest.raises(BackboneWeightsError, match=r"resnet10.*unexpected keys"):
        check_backbone_weights(BackboneConfig(name="resnet10", weights_path=resnet18))


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "mobilenet_v3_large", "regnet_y_400mf"])
def test_dilation_only_for_resnet50_and_101(name: str) -> None:
    with pytest.raises(ValidationError, match=r"dilation \(DC5\) needs resnet50/101.*feature_level=c4"):
        BackboneConfig(name=name, dilation=True)


def test_unknown_backbone_name_is_rejected() -> None:
    with pytest.raises(ValidationError, match="mobilenet_v3_small"):
        BackboneConfig(name="mobilenet_v2")


def test_sizes_given_on_the_host_give_the_features_of_the_mask_and_wrong_ones_fail() -> None:
    backbone = _scratch("resnet10", feature_level="c4").eval()
    images, mask = pad_batch([random_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)])
    with torch.no_grad():
        from_mask, given = backbone(images, mask), backbone(images, mask, SIZES)
    assert torch.equal(from_mask.features, given.features) and torch.equal(from_mask.padding_mask, given.padding_mask)
    for wrong in (SIZES[:1], [(0, 10), SIZES[1]], [(129, 160), SIZES[1]]):
        with pytest.raises(ValueError, match="image_sizes"):
            backbone(images, mask, wrong)
