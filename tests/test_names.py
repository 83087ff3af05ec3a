"""Shared names (sd_detr.names, pipelines.tags) and the normalized-box -> pixel helper."""

import torch

from sd_detr.box_ops import cxcywh_to_pixel_xyxy, size_scale
from sd_detr.names import (
    BEST_VAL_AP,
    ENCODER_OUTPUT,
    TRAIN_LOSS,
    VAL_AP,
    layer_index,
    layer_key,
    loss_metric,
    train_metric,
    val_metric,
)


def test_metric_names_are_the_logged_spellings():
    assert (VAL_AP, BEST_VAL_AP, TRAIN_LOSS) == ("val_AP", "best_val_AP", "train_loss")
    assert train_metric(loss_metric("giou")) == "train_loss_giou"
    assert val_metric("AP50") == "val_AP50"


def test_layer_keys_round_trip():
    assert [layer_index(layer_key(i)) for i in (0, 5, 12)] == [0, 5, 12]
    assert layer_index(ENCODER_OUTPUT) is None
    assert layer_index("layer_x") is None


def test_tags_keep_their_values():
    from pipelines import tags, tracking

    assert tracking.AP_TAG == tags.AP_TAG == "val_AP"
    assert tracking.RUN_NAME_TAG == "sd_detr.run_name"
    assert tags.REGISTERED_VERSION_TAG == "sd_detr.registered_version"


def test_cxcywh_to_pixel_xyxy_scalar_and_batched():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.25], [0.25, 0.75, 0.1, 0.1]])
    pixels = cxcywh_to_pixel_xyxy(boxes, 40, 100)  # height 40, width 100
    assert torch.allclose(pixels, torch.tensor([[25.0, 15.0, 75.0, 25.0], [20.0, 28.0, 30.0, 32.0]]))
    sizes = torch.tensor([[40, 100], [20, 10]])
    batched = cxcywh_to_pixel_xyxy(boxes[:, None, :], sizes[:, 0, None], sizes[:, 1, None])
    assert batched.shape == (2, 1, 4)
    assert torch.allclose(batched[1, 0], torch.tensor([2.0, 14.0, 3.0, 16.0]))
    assert size_scale(torch.tensor([2, 3]), torch.tensor([5, 7])).tolist() == [[5, 2, 5, 2], [7, 3, 7, 3]]
