"""Pretrained backbone weights: torchvision state_dict files (torch or safetensors) load exactly, unfit or unsafe
files fail clearly naming the path and keys, and the training-job rule (weights file or explicit opt-out)."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from sd_detr.backbone import ResNetBackbone
from sd_detr.backbone_weights import (
    BackboneWeightsError,
    check_backbone_weights,
    random_backbone_warning,
    require_backbone_init,
    without_backbone_weights,
)
from sd_detr.config import BackboneConfig, ConditionalDetrModelConfig


def torchvision_state(name: str, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """The state_dict of torchvision's own ResNet with one weight and one BN statistic perturbed (so a load
    that silently kept the random init, or skipped buffers, is caught)."""
    torch.manual_seed(seed)
    net = getattr(torchvision.models, name)(weights=None)
    with torch.no_grad():
        net.layer3[1].conv1.weight.add_(torch.randn_like(net.layer3[1].conv1.weight))
        net.layer1[0].bn1.running_mean.add_(0.5)
        net.bn1.running_var.mul_(3.0)
    return net.state_dict()


@pytest.fixture(scope="module")
def resnet50_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, OrderedDict[str, torch.Tensor]]:
    state = torchvision_state("resnet50")
    path = tmp_path_factory.mktemp("weights") / "resnet50.pth"
    torch.save(state, path)
    return path, state


def _assert_backbone_holds(backbone: ResNetBackbone, state: dict[str, torch.Tensor], c4: bool = False) -> None:
    """Every stem/layer parameter and BN statistic of ``backbone`` equals torchvision's key of the same name."""
    ours = {}
    stem = {"0": "conv1", "1": "bn1"}
    for key, value in backbone.state_dict().items():
        if key.startswith("stem."):
            index, rest = key.removeprefix("stem.").split(".", 1)
            key = f"{stem[index]}.{rest}"
        ours[key] = value
    expected = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    if c4:
        expected = {k: v for k, v in expected.items() if not k.startswith("layer4.")}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key], value), key


def test_resnet50_state_dict_from_torchvision_loads_exactly(resnet50_file) -> None:
    path, state = resnet50_file
    config = BackboneConfig(name="resnet50", weights_path=path)
    check_backbone_weights(config)
    backbone = ResNetBackbone(config)
    _assert_backbone_holds(backbone, state)
    assert torch.equal(backbone.layer3[1].conv1.weight, state["layer3.1.conv1.weight"])
    random = ResNetBackbone(BackboneConfig(name="resnet50"))
    assert not torch.equal(random.layer3[1].conv1.weight, state["layer3.1.conv1.weight"])


def test_resnet50_weights_load_into_dc5_and_c4(resnet50_file) -> None:
    path, state = resnet50_file
    _assert_backbone_holds(ResNetBackbone(BackboneConfig(name="resnet50", dilation=True, weights_path=path)), state)
    c4 = ResNetBackbone(BackboneConfig(name="resnet50", feature_level="c4", weights_path=path))
    _assert_backbone_holds(c4, state, c4=True)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet18_state_dict_loads_from_torch_and_safetensors_files(tmp_path: Path, suffix: str) -> None:
    state = torchvision_state("resnet18", seed=1)
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    config = BackboneConfig(name="resnet18", weights_path=path)
    check_backbone_weights(config)
    _assert_backbone_holds(ResNetBackbone(config), state)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    config = BackboneConfig(name="resnet50", weights_path=tmp_path / "nope.pth")
    for check in (check_backbone_weights, ResNetBackbone):
        with pytest.raises(FileNotFoundError, match=r"model\.backbone\.weights_path.*nope\.pth"):
            check(config)


def test_file_of_another_architecture_names_path_and_keys(resnet50_file) -> None:
    path, _ = resnet50_file
    config = BackboneConfig(name="resnet18", weights_path=path)
    for check in (check_backbone_weights, ResNetBackbone):
        with pytest.raises(BackboneWeightsError) as error:
            check(config)
        message = str(error.value)
        assert str(path) in message and "resnet18" in message
        assert "unexpected keys" in message and "layer1.0.conv3.weight" in message
        assert "wrong shape" in message and "layer1.0.conv1.weight" in message


def test_incomplete_file_names_missing_keys(tmp_path: Path) -> None:
    state = torchvision_state("resnet18")
    del state["layer4.1.bn2.running_var"], state["conv1.weight"]
    path = tmp_path / "cut.pth"
    torch.save(state, path)
    with pytest.raises(BackboneWeightsError, match=r"2 missing keys \['conv1.weight', 'layer4.1.bn2.running_var'\]"):
        check_backbone_weights(BackboneConfig(name="resnet18", weights_path=path))


def test_batchnorm_file_into_group_norm_backbone_says_why(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(torchvision_state("resnet18"), path)
    with pytest.raises(BackboneWeightsError, match=r"BatchNorm statistics.*norm=group_norm"):
        check_backbone_weights(BackboneConfig(name="resnet18", norm="group_norm", weights_path=path))


class _NotAStateDict:
    pass


def test_wrapped_or_pickled_files_are_refused(tmp_path: Path) -> None:
    wrapped = tmp_path / "checkpoint.pth"
    torch.save({"model": torchvision_state("resnet18"), "epoch": 3}, wrapped)
    with pytest.raises(BackboneWeightsError, match="not a flat state_dict"):
        check_backbone_weights(BackboneConfig(name="resnet18", weights_path=wrapped))
    pickled = tmp_path / "object.pth"
    torch.save(_NotAStateDict(), pickled)  # weights_only loading refuses arbitrary classes
    with pytest.raises(BackboneWeightsError, match="not a readable state_dict"):
        check_backbone_weights(BackboneConfig(name="resnet18", weights_path=pickled))


def test_job_rule_and_warnings() -> None:
    with pytest.raises(ValueError, match=r"model\.backbone\.weights_path is not set.*pretrained=false"):
        require_backbone_init(BackboneConfig(name="resnet50"))
    require_backbone_init(BackboneConfig(name="resnet50", pretrained=False))
    require_backbone_init(BackboneConfig(name="resnet50", weights_path=Path("x.pth")))
    assert random_backbone_warning(BackboneConfig(weights_path=Path("x.pth"))) is None
    frozen = random_backbone_warning(BackboneConfig(name="resnet50", pretrained=False, trainable_layers=3))
    assert "RANDOM" in frozen and "frozen BatchNorm" in frozen and "2 frozen stage(s)" in frozen
    assert "GroupNorm" in random_backbone_warning(BackboneConfig(norm="group_norm", pretrained=False))


def test_model_built_for_a_checkpoint_skips_the_weights_file(tmp_path: Path) -> None:
    config = ConditionalDetrModelConfig(backbone={"name": "resnet18", "weights_path": tmp_path / "gone.pth"})
    stripped = without_backbone_weights(config)
    assert stripped.backbone.weights_path is None and type(stripped) is ConditionalDetrModelConfig
    ResNetBackbone(stripped.backbone)  # no FileNotFoundError: the file is not read
