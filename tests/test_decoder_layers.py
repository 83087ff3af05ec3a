"""Decoder depth: every trainable parameter takes part in the loss whatever the number of decoder layers, as
DDP with ``find_unused_parameters=False`` requires (a parameter without a gradient fails its second step)."""

from __future__ import annotations

import pytest

from sd_detr.config import DetectorConfig
from sd_detr.engine import build_criterion
from sd_detr.model import build_detector
from tests.toy_data import toy_batch


def tiny_config(num_decoder_layers: int, **model: object) -> DetectorConfig:
    """A detector config small enough for a CPU step: resnet10, d_model 32, one encoder layer, 6 slots."""
    spec = {
        "num_classes": 3, "num_queries": 6, "backbone": {"name": "resnet10"},
        "transformer": {"d_model": 32, "num_heads": 4, "num_encoder_layers": 1,
                        "num_decoder_layers": num_decoder_layers, "ffn_dim": 64, "dropout": 0.0},
    }  # fmt: skip
    spec.update(model)
    return DetectorConfig.model_validate({"model": spec})


def parameters_without_gradient(config: DetectorConfig) -> list[str]:
    """Names of the trainable parameters that one forward + backward of the full loss on two toy images
    leaves without a gradient."""
    model = build_detector(config.model, seed=0)
    images, padding_mask, targets = toy_batch()
    outputs = model(images[:2], padding_mask[:2])
    build_criterion(config)(outputs.decoder_layers(), targets[:2], outputs.encoder).total.backward()
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad and parameter.grad is None]


@pytest.mark.parametrize(
    "model",
    [
        {"variant": "conditional_detr"},
        {"variant": "sd_detr", "taq": True},
        {"variant": "sd_detr", "taq": False},
    ],
    ids=["conditional_detr", "sd_detr-taq", "sd_detr-no_taq"],
)
def test_one_decoder_layer_leaves_no_parameter_without_gradient(model: dict[str, object]) -> None:
    assert parameters_without_gradient(tiny_config(1, **model)) == []


@pytest.mark.parametrize("variant", ["conditional_detr", "sd_detr"])
def test_query_scale_exists_only_with_later_layers(variant: str) -> None:
    """The spatial-query transform T is used from the second layer on: a one-layer decoder has none, a deeper
    one keeps it under its usual name (checkpoints of deeper models load unchanged)."""

    def query_scale_names(layers: int) -> set[str]:
        model = build_detector(tiny_config(layers, variant=variant).model, seed=0)
        return {name for name in model.state_dict() if "query_scale" in name}

    prefixes = ["query_scale"] if variant == "conditional_detr" else ["cls_query_scale", "loc_query_scale"]
    expected = {
        f"decoding.decoder.{prefix}.layers.{index}.{kind}"
        for prefix in prefixes
        for index in (0, 1)
        for kind in ("weight", "bias")
    }
    assert query_scale_names(1) == set()
    assert query_scale_names(2) == expected
