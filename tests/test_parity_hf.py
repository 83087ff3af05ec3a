"""Our Conditional DETR equals Hugging Face transformers' ConditionalDetr (independent implementation)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sd_detr.config import ConditionalDetrModelConfig, LossConfig, MatcherConfig, ModelConfig
from sd_detr.heads import Predictions
from sd_detr.losses import SetCriterion
from sd_detr.matcher import HungarianMatcher
from sd_detr.model import build_detector

transformers = pytest.importorskip("transformers")
from transformers.loss.loss_deformable_detr import (  # noqa: E402
    DeformableDetrForObjectDetectionLoss,
    DeformableDetrHungarianMatcher,
)
from transformers.models.conditional_detr.modeling_conditional_detr import inverse_sigmoid  # noqa: E402

from tests.hf_reference import build_hf_model, copy_hf_weights  # noqa: E402

TOLERANCE = 1e-5

CONFIGS = [
    dict(d_model=64, num_heads=4, num_encoder_layers=2, num_decoder_layers=3, ffn_dim=128, queries=12),
    dict(d_model=96, num_heads=6, num_encoder_layers=1, num_decoder_layers=4, ffn_dim=80, queries=7),
]


def _model_config(spec: dict) -> ModelConfig:
    return ConditionalDetrModelConfig(
        num_classes=5,
        num_queries=spec["queries"],
        backbone={"name": "resnet18"},
        transformer={
            k: spec[k] for k in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "ffn_dim")
        }
        | {"dropout": 0.0},
    )


def _padded_inputs(channels: int, d_model: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(3, channels, 6, 7, generator=generator)
    padding_mask = torch.zeros(3, 6, 7, dtype=torch.bool)
    padding_mask[1, 4:, :] = True  # shorter image
    padding_mask[2, :, 5:] = True  # narrower image
    position = torch.randn(3, d_model, 6, 7, generator=generator)
    return features, padding_mask, position


@pytest.mark.parametrize("spec", CONFIGS, ids=["d64-h4-e2-d3-q12", "d96-h6-e1-d4-q7"])
def test_transformer_and_heads_match_hf(spec: dict) -> None:
    config = _model_config(spec)
    ours = build_detector(config, seed=0).eval()
    channels = ours.backbone.num_channels
    hf = build_hf_model(config, channels, seed=1)
    copy_hf_weights(hf, ours)
    features, padding_mask, position = _padded_inputs(channels, spec["d_model"], seed=2)

    with torch.no_grad():
        out = ours.forward_features(features, padding_mask, position)
        valid = (~padding_mask).flatten(1).long()
        flat = hf.model.input_projection(features).flatten(2).transpose(1, 2)
        pos = position.flatten(2).transpose(1, 2)
        memory = hf.model.encoder(inputs_embeds=flat, attention_mask=valid, spatial_position_embeddings=pos)
        memory = memory.last_hidden_state
        query_pos = hf.model.query_position_embeddings.weight[None].repeat(3, 1, 1)
        decoded = hf.model.decoder(
            inputs_embeds=torch.zeros_like(query_pos),
            encoder_hidden_states=memory,
            encoder_attention_mask=valid,
            spatial_position_embeddings=pos,
            object_queries_position_embeddings=query_pos,
        )
        hidden = decoded.last_hidden_state
        logits = hf.class_labels_classifier(hidden)
        offsets = hf.bbox_predictor(hidden)
        offsets[..., :2] += inverse_sigmoid(decoded.reference_points).transpose(0, 1)
        boxes = offsets.sigmoid()

    assert (out.memory - memory).abs().max() <= TOLERANCE
    assert (out.decoder.hidden[-1] - hidden).abs().max() <= TOLERANCE
    assert (out.logits - logits).abs().max() <= TOLERANCE
    assert (out.boxes - boxes).abs().max() <= TOLERANCE
    assert out.logits.shape == (3, spec["queries"], 5)
    assert len(out.aux) == spec["num_decoder_layers"] - 1


def _random_predictions_and_targets(seed: int, layers: int = 3, batch: int = 4, queries: int = 9, classes: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, queries, classes, generator=generator)
    centers = torch.rand(layers, batch, queries, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(layers, batch, queries, 2, generator=generator) * 0.3 + 0.05
    boxes = torch.cat([centers, sizes], dim=-1)
    targets = []
    for count in (3, 0, 1, 5)[:batch]:
        t_centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        t_sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        targets.append({
            "labels": torch.randint(0, classes, (count,), generator=generator),
            "boxes": torch.cat([t_centers, t_sizes], dim=-1),
        })  # fmt: skip
    return logits, boxes, targets


def test_matcher_assignment_matches_hf() -> None:
    logits, boxes, targets = _random_predictions_and_targets(seed=3)
    ours = HungarianMatcher(MatcherConfig())(logits[-1], boxes[-1], targets)
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    theirs = DeformableDetrHungarianMatcher(class_cost=2.0, bbox_cost=5.0, giou_cost=2.0)(
        {"logits": logits[-1], "pred_boxes": boxes[-1]}, hf_targets
    )
    for (our_rows, our_cols), (their_rows, their_cols) in zip(ours, theirs, strict=True):
        assert torch.equal(our_rows, their_rows)
        assert torch.equal(our_cols, their_cols)


def test_loss_values_match_hf() -> None:
    logits, boxes, targets = _random_predictions_and_targets(seed=4)
    layers = logits.shape[0]
    criterion = SetCriterion(HungarianMatcher(MatcherConfig()), LossConfig(align_loss_weight=0.0))
    ours = criterion([Predictions(logits[i], boxes[i]) for i in range(layers)], targets)

    hf_config = SimpleNamespace(
        class_cost=2.0,
        bbox_cost=5.0,
        giou_cost=2.0,
        num_labels=logits.shape[-1],
        focal_alpha=0.25,
        auxiliary_loss=True,
        decoder_layers=layers,
        bbox_loss_coefficient=5.0,
        giou_loss_coefficient=2.0,
    )
    hf_targets = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    _, loss_dict, _ = DeformableDetrForObjectDetectionLoss(
        logits[-1], hf_targets, "cpu", boxes[-1], hf_config, logits, boxes
    )
    names = {"class": "loss_ce", "bbox": "loss_bbox", "giou": "loss_giou"}
    for layer in range(layers):
        suffix = "" if layer == layers - 1 else f"_{layer}"
        for ours_name, hf_name in names.items():
            expected = loss_dict[hf_name + suffix]
            assert abs(float(ours.per_output[f"layer_{layer}"][ours_name]) - float(expected)) <= TOLERANCE
    expected_total = sum(
        2.0 * loss_dict["loss_ce" + s] + 5.0 * loss_dict["loss_bbox" + s] + 2.0 * loss_dict["loss_giou" + s]
        for s in ["", *[f"_{i}" for i in range(layers - 1)]]
    )
    assert abs(float(ours.total) - float(expected_total)) <= 1e-4
