"""SD-DETR parts: TAQ sampling, the alignment loss, query_split sharing, stream separation, ablations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sd_detr.config import DetectorConfig, LossConfig, MatcherConfig, load_config
from sd_detr.engine import build_criterion, build_optimizer, train_step
from sd_detr.heads import Predictions
from sd_detr.losses import SetCriterion
from sd_detr.matcher import HungarianMatcher
from sd_detr.model import build_detector
from sd_detr.taq import TaskAwareQueryGenerator, cell_proposals, perimeter_points
from tests.toy_data import toy_batch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "variants"


def small_model_config(**model: object):
    spec = {
        "variant": "sd_detr", "num_classes": 3, "num_queries": 6, "backbone": {"name": "resnet18"},
        "transformer": {"d_model": 32, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 3,
                        "ffn_dim": 64, "dropout": 0.0},
    }  # fmt: skip
    spec.update(model)
    return DetectorConfig.model_validate({"model": spec}).model


# ---- TAQ ------------------------------------------------------------------------------------------------


def _memory(seed: int = 0, batch: int = 2, height: int = 6, width: int = 7, d_model: int = 32):
    generator = torch.Generator().manual_seed(seed)
    memory = torch.randn(batch, height * width, d_model, generator=generator)
    padding = torch.zeros(batch, height, width, dtype=torch.bool)
    padding[1, 4:, :] = True
    padding[1, :, 5:] = True
    return memory, padding


def test_taq_points_inside_and_on_perimeter() -> None:
    torch.manual_seed(0)
    generator = TaskAwareQueryGenerator(32, 3, num_queries=6, num_points=8, class_prior_prob=0.01, proposal_size=0.2)
    with torch.no_grad():  # random offsets so points are not at their initial positions
        generator.cls_point_offsets.weight.normal_(0, 1.0)
    memory, padding = _memory()
    queries = generator(memory, padding.flatten(1), (6, 7))
    anchors = queries.anchors
    x0, y0 = anchors[..., 0] - anchors[..., 2] / 2, anchors[..., 1] - anchors[..., 3] / 2
    x1, y1 = anchors[..., 0] + anchors[..., 2] / 2, anchors[..., 1] + anchors[..., 3] / 2
    px, py = queries.cls_points.unbind(-1)
    assert ((px >= x0[..., None]) & (px <= x1[..., None]) & (py >= y0[..., None]) & (py <= y1[..., None])).all()
    lx, ly = queries.loc_points.unbind(-1)
    distance_to_edge = (
        torch.stack(
            [
                (lx - x0[..., None]).abs(),
                (lx - x1[..., None]).abs(),
                (ly - y0[..., None]).abs(),
                (ly - y1[..., None]).abs(),
            ]
        )
        .min(0)
        .values
    )
    assert distance_to_edge.max() < 1e-6
    assert queries.is_anchor.all() and queries.encoder.boxes.requires_grad
    # anchors are detached: no gradient reaches the mini-detector through them
    grads = torch.autograd.grad(anchors.sum(), list(generator.box_head.parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)


@pytest.mark.parametrize("side", [0.05, 0.3])
def test_untrained_mini_detector_boxes_are_the_cell_proposals_of_the_configured_side(side: float) -> None:
    """With its last box layer at zero the mini-detector predicts each cell's proposal: the cell's center
    (relative to the valid extent) and the configured side (``model.taq_proposal_size``)."""
    torch.manual_seed(0)
    generator = build_detector(small_model_config(taq_proposal_size=side)).decoding.query_generator
    memory, padding = _memory()
    boxes = generator(memory, padding.flatten(1), (6, 7)).encoder.boxes
    assert torch.allclose(boxes[..., 2:], torch.full_like(boxes[..., 2:], side), atol=1e-6)
    for image in range(2):
        proposals = cell_proposals(padding, side)[image][~padding[image].flatten()]
        distance = torch.cdist(boxes[image], proposals).min(1).values
        assert distance.max() < 1e-3  # every selected box is a valid cell's proposal (cells lie 1/7 apart)


def test_perimeter_points_are_side_midpoints_for_four() -> None:
    box = torch.tensor([[[0.5, 0.5, 0.4, 0.2]]])
    expected = torch.tensor([[0.5, 0.4], [0.7, 0.5], [0.5, 0.6], [0.3, 0.5]])
    assert torch.allclose(perimeter_points(box, 4)[0, 0], expected, atol=1e-6)


def test_padded_memory_never_changes_the_queries() -> None:
    torch.manual_seed(0)
    generator = TaskAwareQueryGenerator(
        32, 3, num_queries=6, num_points=4, class_prior_prob=0.01, proposal_size=0.2
    ).eval()
    memory, padding = _memory()
    tampered = memory.clone()
    tampered[padding.flatten(1)] = 1e4 * torch.randn(int(padding.sum()), 32)
    first = generator(memory, padding.flatten(1), (6, 7))
    second = generator(tampered, padding.flatten(1), (6, 7))
    # valid cells near the padding border are sampled: the queries still must not change
    assert torch.equal(first.anchors, second.anchors)
    assert torch.allclose(first.cls_content, second.cls_content, atol=1e-6)
    assert torch.allclose(first.loc_content, second.loc_content, atol=1e-6)


def test_taq_fills_slots_beyond_the_valid_cells_with_learned_queries() -> None:
    """7 and 12 valid cells for 10 slots: each image's valid cells are its first anchors (best first), the
    rest are fill slots with the learned pairs 0, 1, 2, ... and the learned boxes; the encoder output
    marks exactly the anchors valid."""
    torch.manual_seed(0)
    generator = TaskAwareQueryGenerator(
        32, 3, num_queries=10, num_points=4, class_prior_prob=0.01, proposal_size=0.2
    ).eval()
    memory = torch.randn(2, 12, 32)
    padding = torch.zeros(2, 3, 4, dtype=torch.bool)
    padding[0, :, 2:] = True  # image 0: 3x2 = 6 valid cells
    padding[0, 0, 2] = False  # not a rectangle, but TAQ only counts cells: 7 valid
    with torch.no_grad():
        queries = generator(memory, padding.flatten(1), (3, 4))
    assert queries.is_anchor.sum(1).tolist() == [7, 10]
    assert queries.is_anchor[0, :7].all() and not queries.is_anchor[0, 7:].any()
    assert torch.equal(queries.encoder.valid, queries.is_anchor)
    fills = torch.arange(3)
    assert torch.equal(queries.cls_content[0, 7:], generator.fill_cls_content.weight[fills])
    assert torch.equal(queries.loc_content[0, 7:], generator.fill_loc_content.weight[fills])
    assert torch.allclose(queries.anchors[0, 7:], generator.fill_reference.weight[fills].sigmoid())
    # anchors are valid cells only, best score first
    scores = generator.class_head(generator.memory_norm(generator.memory_proj(memory))).max(-1).values
    chosen = queries.encoder.logits[0, :7].max(-1).values
    valid_scores = scores[0][~padding[0].flatten()]
    assert torch.allclose(chosen, valid_scores.sort(descending=True).values, atol=1e-6)


def test_taq_on_a_one_cell_map_and_a_map_smaller_than_the_slots() -> None:
    torch.manual_seed(0)
    generator = TaskAwareQueryGenerator(32, 3, num_queries=6, num_points=4, class_prior_prob=0.01, proposal_size=0.2)
    memory = torch.randn(1, 1, 32, requires_grad=True)
    queries = generator(memory, torch.zeros(1, 1, dtype=torch.bool), (1, 1))
    assert queries.is_anchor.tolist() == [[True, False, False, False, False, False]]
    assert queries.anchors.shape == (1, 6, 4) and torch.isfinite(queries.cls_content).all()
    (queries.cls_content.sum() + queries.loc_content.sum() + queries.encoder.logits[:, :1].sum()).backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0
    assert generator.fill_cls_content.weight.grad[:5].abs().sum() > 0
    assert not generator.fill_cls_content.weight.grad[5:].any()  # only 5 fill slots were used


def test_invalid_slots_are_never_matched_and_get_no_loss() -> None:
    """Encoder outputs carry a validity mask (TAQ fill slots): the matcher skips invalid slots even when
    they would be perfect matches, and no term changes whatever they hold."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=generator)
    boxes = torch.cat([torch.rand(2, 5, 2, generator=generator) * 0.5 + 0.25, torch.full((2, 5, 2), 0.2)], -1)
    valid = torch.tensor([[True, True, False, False, False], [True, True, False, False, False]])
    targets = [
        {"labels": torch.tensor([0, 1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.1, 0.3],
                                                                 [0.5, 0.4, 0.3, 0.2]])},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]  # fmt: skip
    for image, target in enumerate(targets):  # invalid slots 2.. predict the targets perfectly
        count = len(target["labels"])
        boxes[image, 2 : 2 + count] = target["boxes"]
        logits[image, 2 + torch.arange(count), target["labels"]] = 10.0
    config = LossConfig(aux_loss=False)
    matcher = HungarianMatcher(MatcherConfig())
    assignments = matcher(logits, boxes, targets, valid)
    assert sorted(assignments[0][0].tolist()) == [0, 1]  # 2 valid slots for 3 targets: 2 matches
    assert len(assignments[1][0]) == 1 and assignments[1][0].item() in (0, 1)
    criterion = SetCriterion(matcher, config)
    masked = criterion.output_terms(Predictions(logits, boxes, valid), targets, 4.0, with_alignment=True)
    compact = criterion.output_terms(Predictions(logits[:, :2], boxes[:, :2]), targets, 4.0, with_alignment=True)
    tampered_logits, tampered_boxes = logits.clone(), boxes.clone()
    tampered_logits[:, 2:] = -3.0
    tampered_boxes[:, 2:] = 0.9
    tampered = criterion.output_terms(Predictions(tampered_logits, tampered_boxes, valid), targets, 4.0, True)
    for name in ("class", "bbox", "giou", "align"):
        assert torch.allclose(masked[name], compact[name], rtol=1e-6, atol=1e-8), name
        assert torch.allclose(tampered[name], compact[name], rtol=1e-6, atol=1e-8), name


# ---- TAL ------------------------------------------------------------------------------------------------


def test_alignment_loss_equals_hand_computation() -> None:
    logits = torch.tensor([[[2.0, -1.0], [0.5, 0.0]]])  # one image, 2 slots, 2 classes
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.1]]])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.55, 0.5, 0.2, 0.2]])}
    config = LossConfig(class_weight=0, bbox_weight=0, giou_weight=0, align_loss_weight=1.0, aux_loss=False)
    matcher = HungarianMatcher(MatcherConfig(class_cost=0.0, bbox_cost=1.0, giou_cost=0.0))
    loss = SetCriterion(matcher, config)([Predictions(logits, boxes)], [target])

    # slot 0 matches the target: IoU of [0.4,0.4,0.6,0.6] with [0.45,0.4,0.65,0.6] = 0.03 / 0.05 = 0.6
    s = torch.sigmoid(torch.tensor(2.0))
    t = s**0.25 * 0.6**0.75
    bce = lambda p, y: -(y * torch.log(p) + (1 - y) * torch.log(1 - p))  # noqa: E731
    expected = bce(s, t)
    for logit in (-1.0, 0.5, 0.0):  # the three negatives, weight s^2
        p = torch.sigmoid(torch.tensor(logit))
        expected = expected + p**2 * bce(p, torch.tensor(0.0))
    assert float(loss.per_output["layer_0"]["align"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss.total) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.slow
def test_zero_alignment_weight_equals_the_model_without_the_term() -> None:
    images, padding_mask, targets = toy_batch()
    config = DetectorConfig(model=small_model_config(num_queries=8), loss=LossConfig(align_loss_weight=0.0))

    def loss_and_grads(total_fn):
        model = build_detector(config.model, seed=0)
        total = total_fn(model)
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def with_zero_weight(model):
        outputs = model(images, padding_mask)
        losses = build_criterion(config)(outputs.decoder_layers(), targets, outputs.encoder)
        assert "align" not in losses.final_terms()
        return losses.total

    def without_the_term(model):  # focal + L1 + GIoU only, summed by hand over every output
        outputs = model(images, padding_mask)
        criterion = SetCriterion(
            HungarianMatcher(config.matcher), config.loss.model_copy(update={"align_loss_weight": 5.0})
        )
        predictions = [*outputs.decoder_layers(), outputs.encoder]
        terms = [
            criterion.output_terms(p, targets, criterion.num_boxes(targets, images.device), False) for p in predictions
        ]
        return sum(2.0 * t["class"] + 5.0 * t["bbox"] + 2.0 * t["giou"] for t in terms)

    total_zero, grads_zero = loss_and_grads(with_zero_weight)
    total_without, grads_without = loss_and_grads(without_the_term)
    assert torch.allclose(total_zero, total_without, rtol=1e-6, atol=0)
    assert grads_zero.keys() == grads_without.keys()
    assert all(torch.allclose(grads_zero[n], grads_without[n], rtol=1e-5, atol=1e-8) for n in grads_zero)
    weighted = SetCriterion(HungarianMatcher(config.matcher), config.loss.model_copy(update={"align_loss_weight": 1.0}))
    model = build_detector(config.model, seed=0)
    outputs = model(images, padding_mask)
    assert "align" in weighted(outputs.decoder_layers(), targets, outputs.encoder).final_terms()


# ---- DFL: query_split and stream separation ---------------------------------------------------------------


def _cross_blocks(model) -> dict[str, list]:
    layers = model.decoding.decoder.layers
    return {
        "shared": [layer.shared_cross for layer in layers if not layer.divided],
        "divided": [(layer.cls_cross, layer.loc_cross) for layer in layers if layer.divided],
    }


def test_query_split_controls_sharing() -> None:
    never = build_detector(small_model_config(query_split=3), seed=0)
    always = build_detector(small_model_config(query_split=0), seed=0)
    middle = build_detector(small_model_config(query_split=1), seed=0)
    assert len(_cross_blocks(never)["shared"]) == 3 and not _cross_blocks(never)["divided"]
    assert not _cross_blocks(always)["shared"] and len(_cross_blocks(always)["divided"]) == 3
    assert len(_cross_blocks(middle)["shared"]) == 1 and len(_cross_blocks(middle)["divided"]) == 2
    for cls_block, loc_block in _cross_blocks(always)["divided"]:
        assert cls_block is not loc_block
        assert {id(p) for p in cls_block.parameters()}.isdisjoint(id(p) for p in loc_block.parameters())
    block_params = sum(p.numel() for p in never.decoding.decoder.layers[0].shared_cross.parameters())
    later_block_params = sum(p.numel() for p in never.decoding.decoder.layers[1].shared_cross.parameters())
    total_never = sum(p.numel() for p in never.parameters())
    total_always = sum(p.numel() for p in always.parameters())
    # dividing every layer adds exactly one more cross block per layer
    assert total_always - total_never == block_params + 2 * later_block_params


def _stream_parameters(model) -> tuple[dict, dict]:
    """Parameters used only after the streams' last meeting point (the last layer's self-attention)."""
    decoder = model.decoding.decoder
    last = decoder.layers[-1]
    cls_only = {**{f"cls_cross.{n}": p for n, p in last.cls_cross.named_parameters()},
                **{f"cls_norm.{n}": p for n, p in decoder.cls_norm.named_parameters()},
                **{f"class_head.{n}": p for n, p in model.decoding.heads.class_head.named_parameters()}}  # fmt: skip
    loc_only = {**{f"loc_cross.{n}": p for n, p in last.loc_cross.named_parameters()},
                **{f"loc_norm.{n}": p for n, p in decoder.loc_norm.named_parameters()},
                **{f"box_head.{n}": p for n, p in model.decoding.heads.box_head.named_parameters()}}  # fmt: skip
    return cls_only, loc_only


@pytest.mark.slow
@pytest.mark.parametrize("taq", [True, False])
def test_class_and_box_gradients_stay_in_their_stream(taq: bool) -> None:
    config = DetectorConfig(model=small_model_config(num_queries=8, taq=taq))
    images, padding_mask, targets = toy_batch()
    for term, own, other in (("class", 0, 1), ("bbox", 1, 0), ("giou", 1, 0)):
        model = build_detector(config.model, seed=0)
        with torch.no_grad():  # break the zero init of the box head so every path carries gradient
            for parameter in model.decoding.heads.box_head.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
        outputs = model(images, padding_mask)
        loss = build_criterion(config).output_terms(outputs.final(), targets, 1.0, with_alignment=False)[term]
        loss.backward()
        groups = _stream_parameters(model)
        assert all(p.grad is None or not p.grad.any() for p in groups[other].values()), term
        assert any(p.grad is not None and p.grad.any() for p in groups[own].values()), term


# ---- every ablation config builds and trains a step ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant_file", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_variant_config_trains_a_step(variant_file: str) -> None:
    config = load_config(
        DetectorConfig,
        CONFIGS / variant_file,
        ["model.num_classes=3", "model.num_queries=8", "model.backbone.name=resnet18",
         "model.transformer.d_model=32", "model.transformer.num_heads=4", "model.transformer.ffn_dim=64",
         "model.transformer.num_encoder_layers=1", "model.transformer.num_decoder_layers=2"],
    )  # fmt: skip
    model = build_detector(config.model, seed=0)
    images, padding_mask, targets = toy_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_step(model, build_criterion(config), build_optimizer(model, config.optimizer), images,
                        padding_mask, targets, config.optimizer.grad_clip_norm)  # fmt: skip
    assert torch.isfinite(losses.total)
    assert ("encoder" in losses.per_output) == (config.model.variant == "sd_detr" and config.model.taq)
    assert ("align" in losses.final_terms()) == (config.loss.align_loss_weight > 0)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)


def test_decoder_outputs_have_documented_shapes() -> None:
    model = build_detector(small_model_config(num_queries=8), seed=0)
    images, padding_mask, _ = toy_batch()
    out = model(images, padding_mask)
    assert out.logits.shape == (4, 8, 3) and out.boxes.shape == (4, 8, 4)
    assert len(out.aux) == 2 and out.encoder is not None and out.encoder.logits.shape == (4, 8, 3)
    assert ((out.boxes >= 0) & (out.boxes <= 1)).all()
