"""Pretrained weights for the backbone: read a local torchvision state_dict, check that it fits the
configured architecture, load it; and the rule a training job applies to ``model.backbone``.

The file is the ``state_dict`` of torchvision's own classification model of ``model.backbone.name``, with
torchvision's key names: ResNet ``conv1.weight``, ``layer1.0.bn1.running_mean``, ``fc.weight``, ...;
MobileNetV3 ``features.0.0.weight``, ``features.1.block.0.0.weight``, ``classifier.0.weight``, ...; RegNet
``stem.0.weight``, ``trunk_output.block1.block1-0.f.a.0.weight``, ``fc.weight``, ... (ResNet-10 is torchvision's
``ResNet(BasicBlock, [1, 1, 1, 1])``, resnet18's key names with one block per stage). Such a file is written by
``torch.save(torchvision.models.resnet50(weights=...).state_dict(), path)`` or downloaded from the URL
torchvision documents for its weights. ``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)``: never an unpickler that can run code. Nothing is downloaded here.

The rule (:func:`require_backbone_init`): a training job names its weights file (``model.backbone.weights_path``)
or states that it has none (``model.backbone.pretrained: false``, a random backbone, warned about by
:func:`random_backbone_warning`). Frozen BatchNorm (the paper's backbone) keeps ImageNet statistics fixed, so on
random weights it normalizes nothing and, with frozen stages, leaves random layers untrained: such a run
trains, but its numbers mean nothing next to the paper's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from sd_detr.backbone_nets import build_torchvision_net
from sd_detr.config import BackboneConfig, ModelConfig, backbone_family

SHOWN_KEYS = 5
"""How many missing / unexpected / mismatched keys an error names."""

_HEAD_PREFIXES = {"resnet": "fc.", "regnet": "fc.", "mobilenet": "classifier."}
"""ImageNet classifier of each family: in torchvision's files, never used by the detector."""


class BackboneWeightsError(ValueError):
    """A backbone weights file that cannot be read or does not fit the configured backbone."""


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A state_dict file -> ``{key: tensor}`` on CPU: safetensors for ``.safetensors``, else
    ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        BackboneWeightsError: not a flat mapping of tensors, or not loadable without unpickling code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.weights_path: no such file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt file, or pickled objects that weights_only refuses
        raise BackboneWeightsError(
            f"model.backbone.weights_path {path} is not a readable state_dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); expected a torchvision state_dict saved "
            "with torch.save(model.state_dict(), path) or a .safetensors file"
        ) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        kind = type(state).__name__
        keys = list(state)[:SHOWN_KEYS] if isinstance(state, Mapping) else []
        raise BackboneWeightsError(
            f"model.backbone.weights_path {path} holds a {kind} (keys {keys}), not a flat state_dict of tensors; "
            "save the torchvision model's own model.state_dict() (torchvision key names, no wrapper dict)"
        )
    return dict(state)


def _expected_shapes(net: nn.Module, head_prefix: str) -> dict[str, torch.Size]:
    """Key -> shape of every parameter/buffer of ``net`` that a weights file must provide (no classifier)."""
    return {k: v.shape for k, v in net.state_dict().items() if not k.startswith(head_prefix)}


def _fit(config: BackboneConfig, path: Path, state: dict[str, Tensor], expected: dict[str, torch.Size]) -> dict:
    """``state`` without the classifier and BatchNorm step counters, checked against ``expected``.

    Raises:
        BackboneWeightsError: naming the path and the first missing, unexpected and wrong-shape keys.
    """
    head_prefix = _HEAD_PREFIXES[backbone_family(config.name)]
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith(head_prefix) and not (k.endswith(".num_batches_tracked") and k not in expected)
    }
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(shape)}"
        for k, shape in expected.items()
        if k in state and state[k].shape != shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if keys:
                more = f" (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else ""
                problems.append(f"{len(keys)} {label} keys {keys[:SHOWN_KEYS]}{more}")
        hint = ""
        if config.norm == "group_norm" and any(k.endswith(".running_mean") for k in unexpected):
            hint = (
                "; the file holds BatchNorm statistics (an ImageNet torchvision file) but model.backbone.norm="
                "group_norm: use norm=frozen_batchnorm with ImageNet weights"
            )
        elif mismatched or (missing and unexpected):
            hint = f"; the file looks like another model than model.backbone.name={config.name}"
        raise BackboneWeightsError(
            f"model.backbone.weights_path {path} does not fit a torchvision {config.name} "
            f"(norm={config.norm}): {'; '.join(problems)}{hint}"
        )
    return state


def load_backbone_weights(net: nn.Module, config: BackboneConfig) -> None:
    """Load ``config.weights_path`` into the torchvision network ``net`` built for ``config`` (in place).

    The classifier (``fc.*``; MobileNetV3 ``classifier.*``) is ignored; every other parameter and buffer must be in the file with its shape.

    Raises:
        FileNotFoundError, BackboneWeightsError: see :func:`read_state_dict` and :func:`check_backbone_weights`.
    """
    if config.weights_path is None:
        raise ValueError("load_backbone_weights needs model.backbone.weights_path")
    expected = _expected_shapes(net, _HEAD_PREFIXES[backbone_family(config.name)])
    state = _fit(config, config.weights_path, read_state_dict(config.weights_path), expected)
    net.load_state_dict(state, strict=False)  # strict on everything but the classifier, checked above


def check_backbone_weights(config: BackboneConfig) -> None:
    """Check, without building the network, that ``config.weights_path`` exists, reads as a state_dict and fits
    the configured network (name, norm, dilation). Cheap enough for a driver to run before it starts a cluster.

    Raises:
        FileNotFoundError, BackboneWeightsError: with the path and the first offending keys.
    """
    if config.weights_path is None:
        return
    if backbone_family(config.name) == "regnet":  # its block widths are computed with tensor ops: not on meta
        net = build_torchvision_net(config)  # 400MF: a few million parameters, cheap to initialise
    else:
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            net = build_torchvision_net(config)
    expected = _expected_shapes(net, _HEAD_PREFIXES[backbone_family(config.name)])
    _fit(config, config.weights_path, read_state_dict(config.weights_path), expected)


def require_backbone_init(config: BackboneConfig) -> None:
    """The training-job rule: the backbone's weights come from ``weights_path`` unless ``pretrained: false``
    says explicitly that they are random.

    Raises:
        ValueError: naming ``model.backbone.weights_path`` and the opt-out.
    """
    if config.pretrained and config.weights_path is None:
        expects = (
            "a frozen-BatchNorm backbone expects ImageNet weights and statistics"
            if config.norm == "frozen_batchnorm"
            else "the backbone's initial weights must be stated"
        )
        raise ValueError(
            f"model.backbone.weights_path is not set ({config.name}, norm={config.norm}): {expects}. Pass a "
            "torchvision ImageNet state_dict file (--set model.backbone.weights_path=/path/resnet50.pth; README: "
            "'Pretrained backbone weights'), or train a random backbone on purpose with "
            "--set model.backbone.pretrained=false"
        )


def random_backbone_warning(config: BackboneConfig) -> str | None:
    """The warning a job logs when its backbone starts from random weights (``pretrained: false``), else None."""
    if config.pretrained:
        return None
    if config.norm == "frozen_batchnorm":
        frozen = 5 - config.trainable_layers
        stages = f" and {frozen} frozen stage(s) that stay random" if frozen else ""
        return (
            f"model.backbone.pretrained=false: the {config.name} backbone starts from RANDOM weights with frozen "
            f"BatchNorm (fixed identity statistics){stages}. "
            "This is not the paper's setting and its AP is not comparable; pass model.backbone.weights_path, or "
            "use norm=group_norm with trainable_layers=5 to train from scratch"
        )
    return (
        f"model.backbone.pretrained=false: the {config.name} backbone (GroupNorm) trains from RANDOM weights "
        "(no ImageNet initialisation); its AP is not comparable to pretrained runs"
    )


def backbone_init_tag(config: BackboneConfig) -> str:
    """A one-line record of where the backbone's weights came from (for a tracking tag)."""
    if config.weights_path is not None:
        return str(config.weights_path)
    return "random (model.backbone.pretrained=false)" if not config.pretrained else "random (no weights_path)"


def without_backbone_weights(config: ModelConfig) -> ModelConfig:
    """``config`` without ``backbone.weights_path``: for building a model whose full weights are loaded next
    (checkpoint, registered model), so the ImageNet file is neither read nor needed on that machine."""
    backbone = config.backbone.model_copy(update={"weights_path": None})
    return config.model_copy(update={"backbone": backbone})
