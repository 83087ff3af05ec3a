"""Diagnostics: score–IoU alignment on hand-made detections, decoder cross-attention maps, PNG rendering."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from matplotlib.image import imread
from torch import nn

from sd_detr.diagnostics import (
    attention_figures,
    attention_on_pixels,
    decoder_cross_attention_maps,
    render_attention_maps,
    save_png,
    score_iou_alignment,
    targets_to_pixel_xyxy,
    top_slots,
)
from sd_detr.model import build_detector
from tests.test_sd_detr import small_model_config
from tests.toy_data import toy_batch

GT_BOX = [0.0, 0.0, 10.0, 10.0]


def _detections(scores: list[float], boxes: list[list[float]], labels: list[int] | None = None) -> dict:
    return {
        "scores": torch.tensor(scores),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels if labels is not None else [0] * len(scores), dtype=torch.int64),
    }


def _targets(boxes: list[list[float]], labels: list[int] | None = None) -> dict:
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels if labels is not None else [0] * len(boxes), dtype=torch.int64),
    }


def _box_with_iou(iou: float) -> list[float]:
    """A box inside GT_BOX (full width, shorter) whose IoU with it is exactly ``iou``."""
    return [0.0, 0.0, 10.0, 10.0 * iou]


# ---- score–IoU alignment --------------------------------------------------------------------------------


def test_scores_ordered_like_iou_give_plus_one_and_reversed_minus_one() -> None:
    ious = [0.9, 0.7, 0.4, 0.2]
    boxes = [_box_with_iou(u) for u in ious]
    aligned = score_iou_alignment([_detections(ious, boxes)], [_targets([GT_BOX])])
    assert aligned["score_iou_spearman"] == pytest.approx(1.0)
    assert aligned["score_iou_pearson"] == pytest.approx(1.0)  # score = IoU: linear
    assert aligned["best_regressed_recall"] == 1.0
    reversed_scores = score_iou_alignment([_detections(ious[::-1], boxes)], [_targets([GT_BOX])])
    assert reversed_scores["score_iou_spearman"] == pytest.approx(-1.0)
    assert reversed_scores["score_iou_pearson"] == pytest.approx(-1.0)
    assert reversed_scores["best_regressed_recall"] == 0.0


def test_spearman_and_pearson_equal_hand_computation() -> None:
    # score ranks (3, 2, 1), IoU ranks (3, 1, 2): rho = 1 - 6 * (0 + 1 + 1) / (3 * (9 - 1)) = 0.5
    scores, ious = [0.9, 0.5, 0.1], [0.8, 0.2, 0.6]
    result = score_iou_alignment([_detections(scores, [_box_with_iou(u) for u in ious])], [_targets([GT_BOX])])
    assert result["score_iou_spearman"] == pytest.approx(0.5)
    s, u = torch.tensor(scores, dtype=torch.float64), torch.tensor(ious, dtype=torch.float64)
    s, u = s - s.mean(), u - u.mean()
    assert result["score_iou_pearson"] == pytest.approx(float((s * u).sum() / (s.norm() * u.norm())), abs=1e-6)
    assert result["num_predictions"] == 3.0


def test_best_regressed_recall_counts_objects_whose_best_box_has_a_low_score() -> None:
    far = [20.0, 20.0, 30.0, 30.0]
    detections = _detections(
        # object A (GT_BOX): best box (IoU 0.9) scores highest -> recalled
        # object B (far): best box (IoU 0.95) scores 0.3 while a worse one (IoU 0.5) scores 0.8 -> missed
        scores=[0.9, 0.4, 0.8, 0.3],
        boxes=[_box_with_iou(0.9), _box_with_iou(0.5), [20.0, 20.0, 30.0, 25.0], [20.0, 20.0, 30.0, 29.5]],
    )
    targets = _targets([GT_BOX, far])
    assert score_iou_alignment([detections], [targets])["best_regressed_recall"] == pytest.approx(0.5)
    # within the top 2 of its own predictions, B's best box is recalled
    assert score_iou_alignment([detections], [targets], recall_top_n=2)["best_regressed_recall"] == 1.0


def test_iou_is_class_aware() -> None:
    # the high-scoring box sits on the object but with the wrong class: IoU 0, and it is no candidate of it
    detections = _detections([0.9, 0.2], [GT_BOX, _box_with_iou(0.6)], labels=[1, 0])
    result = score_iou_alignment([detections], [_targets([GT_BOX], labels=[0])])
    assert result["score_iou_spearman"] == pytest.approx(-1.0)
    assert result["best_regressed_recall"] == 1.0
    assert result["num_objects_assigned"] == 1.0


def test_top_k_limits_the_analysed_predictions_per_image() -> None:
    ious = [0.9, 0.6, 0.3]
    detections = _detections([0.9, 0.6, 0.3, 0.01], [*[_box_with_iou(u) for u in ious], _box_with_iou(0.95)])
    full = score_iou_alignment([detections], [_targets([GT_BOX])])
    top3 = score_iou_alignment([detections], [_targets([GT_BOX])], top_k=3)
    assert top3["num_predictions"] == 3.0 and top3["score_iou_spearman"] == pytest.approx(1.0)
    assert top3["best_regressed_recall"] == 1.0
    assert full["score_iou_spearman"] < 1.0 and full["best_regressed_recall"] == 0.0


def test_positive_correlation_only_uses_predictions_above_the_threshold() -> None:
    # among the good boxes the score is reversed; junk with IoU 0 has the lowest scores
    scores = [0.9, 0.8, 0.7, 0.05, 0.04]
    boxes = [_box_with_iou(0.6), _box_with_iou(0.7), _box_with_iou(0.8), [50, 50, 60, 60], [70, 70, 80, 80]]
    result = score_iou_alignment([_detections(scores, boxes)], [_targets([GT_BOX])])
    assert result["score_iou_spearman"] > 0
    assert result["score_iou_spearman_positive"] == pytest.approx(-1.0)


def test_empty_inputs_give_nan_or_counts_without_crashing() -> None:
    empty_detections = _detections([], [])
    no_images = score_iou_alignment([], [])
    assert math.isnan(no_images["score_iou_spearman"]) and math.isnan(no_images["best_regressed_recall"])
    no_detections = score_iou_alignment([empty_detections], [_targets([GT_BOX])])
    assert math.isnan(no_detections["score_iou_pearson"]) and math.isnan(no_detections["best_regressed_recall"])
    assert no_detections["num_objects"] == 1.0 and no_detections["num_objects_assigned"] == 0.0
    # an image without objects: its predictions have IoU 0 and still count in the pooled correlation
    no_objects = _detections([0.3, 0.1], [[0, 0, 5, 5], [1, 1, 6, 6]])
    one_good = _detections([0.8], [_box_with_iou(0.5)])
    mixed = score_iou_alignment([no_objects, one_good], [_targets([]), _targets([GT_BOX])])
    assert mixed["num_predictions"] == 3.0 and mixed["best_regressed_recall"] == 1.0
    # ranks: scores (2, 1, 3), IoU (1.5, 1.5, 3) (a tie) -> Spearman = Pearson of the ranks = sqrt(3/4)
    assert mixed["score_iou_spearman"] == pytest.approx(math.sqrt(0.75))
    constant = score_iou_alignment([no_objects], [_targets([])])  # every IoU 0: undefined, not an error
    assert math.isnan(constant["score_iou_spearman"]) and math.isnan(constant["best_regressed_recall"])
    with pytest.raises(ValueError, match="2 images of detections but 1"):
        score_iou_alignment([no_objects, one_good], [_targets([])])


def test_targets_to_pixel_xyxy_scales_by_original_size_and_maps_labels() -> None:
    targets = [
        {
            "boxes": torch.tensor([[0.5, 0.25, 0.5, 0.5]]),
            "labels": torch.tensor([1]),
            "orig_size": torch.tensor([200, 100]),
        }
    ]
    converted = targets_to_pixel_xyxy(targets, label_to_category_id=torch.tensor([7, 9]))
    assert torch.allclose(converted[0]["boxes"], torch.tensor([[25.0, 0.0, 75.0, 100.0]]))
    assert converted[0]["labels"].tolist() == [9]


# ---- cross-attention maps -------------------------------------------------------------------------------


def _perturbed_model(heads: int = 4, **model: object) -> nn.Module:
    transformer = {"d_model": 32, "num_heads": heads, "num_encoder_layers": 1, "num_decoder_layers": 2,
                   "ffn_dim": 64, "dropout": 0.0}  # fmt: skip
    detector = build_detector(small_model_config(transformer=transformer, **model), seed=0)
    with torch.no_grad():  # no zero-initialised head or symmetric weights (the backbone is random already)
        for name, parameter in detector.named_parameters():
            if not name.startswith("backbone."):
                parameter.add_(torch.randn_like(parameter) * 0.05)
    return detector


def _no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


VARIANTS = [
    pytest.param({"variant": "conditional_detr"}, ("single",), id="conditional_detr"),
    pytest.param({"variant": "sd_detr"}, ("classification", "localization"), id="sd_detr-divided"),
    pytest.param({"variant": "sd_detr", "query_split": 2, "taq": False}, ("classification", "localization"), id="sd_detr-shared"),
]  # fmt: skip


@pytest.mark.parametrize(("spec", "streams"), VARIANTS)
def test_attention_maps_are_distributions_over_valid_cells(spec: dict, streams: tuple[str, ...]) -> None:
    images, padding_mask, _ = toy_batch()
    model = _perturbed_model(**spec).train()
    attention = decoder_cross_attention_maps(model, images, padding_mask)
    assert model.training and _no_hooks_left(model)
    assert tuple(attention.maps) == streams
    grid = attention.padding_mask
    assert grid.shape == (4, 4, 4) and grid.any() and not grid.all()
    for maps in attention.maps.values():
        assert maps.shape == (4, 6, 4, 4)
        assert torch.allclose(maps.sum(dim=(-2, -1)), torch.ones(4, 6), atol=1e-5)
        assert (maps.masked_select(grid[:, None].expand_as(maps)) == 0).all()
        assert (maps.masked_select(~grid[:, None].expand_as(maps)) > 0).all()
    if len(streams) == 2:
        assert (attention.maps["classification"] - attention.maps["localization"]).abs().max() > 1e-3


@pytest.mark.parametrize(("spec", "streams"), VARIANTS)
def test_single_head_map_reproduces_the_layer_output(spec: dict, streams: tuple[str, ...]) -> None:
    """With one head the map is exactly the attention applied: out_proj(map @ v_proj(memory)) = attn output."""
    images, padding_mask, _ = toy_batch()
    model = _perturbed_model(heads=1, **spec).eval()
    layer = model.decoding.decoder.layers[-1]
    modules = {
        name: getattr(layer, name).attn
        for name in ("cross_block", "cls_cross", "loc_cross", "shared_cross")
        if hasattr(layer, name)
    }
    seen: dict[str, tuple] = {}
    handles = [
        module.register_forward_hook(lambda _m, args, out, name=name: seen.__setitem__(name, (args[3], out)))
        for name, module in modules.items()
    ]
    attention = decoder_cross_attention_maps(model, images, padding_mask)
    for handle in handles:
        handle.remove()
    flat = {name: maps.flatten(2) for name, maps in attention.maps.items()}
    if "shared_cross" in modules:  # one call on [cls ; loc] tokens: the split must keep that order
        checks = [("shared_cross", torch.cat([flat["classification"], flat["localization"]], dim=1))]
    else:
        names = {"cross_block": "single", "cls_cross": "classification", "loc_cross": "localization"}
        checks = [(module_name, flat[names[module_name]]) for module_name in modules]
    for module_name, weights in checks:
        module = modules[module_name]
        memory, output = seen[module_name]
        with torch.no_grad():
            expected = module.out_proj(weights @ module.v_proj(memory))
        assert torch.allclose(expected, output, atol=1e-5)
    assert _no_hooks_left(model)


def test_hooks_are_removed_when_the_forward_pass_fails() -> None:
    model = _perturbed_model(variant="sd_detr", num_queries=40).train()
    images = torch.randn(1, 3, 64, 64)
    holed = torch.zeros(1, 64, 64, dtype=torch.bool)
    holed[0, 10, 10] = True  # valid pixels not a top-left rectangle: the backbone refuses the batch
    with pytest.raises(ValueError, match="not a top-left rectangle"):
        decoder_cross_attention_maps(model, images, holed)
    assert _no_hooks_left(model) and model.training


def test_top_slots_pick_the_highest_max_class_scores() -> None:
    logits = torch.tensor([[[0.0, 3.0], [5.0, -1.0], [-2.0, -3.0], [1.0, 0.5]]])
    slots, scores, labels = top_slots(logits, 2)
    assert slots.tolist() == [[1, 0]] and labels.tolist() == [[0, 1]]
    assert torch.allclose(scores, torch.sigmoid(torch.tensor([[5.0, 3.0]])))


# ---- rendering ------------------------------------------------------------------------------------------


def test_render_writes_a_png_of_the_expected_size(tmp_path: Path) -> None:
    image = (torch.rand(3, 64, 80) * 255).to(torch.uint8)
    maps = {"classification": torch.rand(3, 2, 3).softmax(0), "localization": torch.rand(3, 2, 3)}
    boxes = torch.tensor([[4.0, 4.0, 30.0, 40.0], [10.0, 2.0, 60.0, 50.0], [0.0, 0.0, 70.0, 48.0]])
    figure = render_attention_maps(
        image, maps, boxes, torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0, 2, 1]), valid_size=(50, 72),
        label_names={0: "cat", 1: "dog"}, panel_inches=2.0, dpi=40,
    )  # fmt: skip
    assert len(figure.axes) == 6 and figure.axes[0].get_title() == "classification: cat 0.90"
    path = save_png(figure, tmp_path / "nested" / "attention.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[:2] == (3 * 2 * 40, 2 * 2 * 40)
    assert pixels[..., :3].std() > 0.05  # something was drawn
    with pytest.raises(ValueError, match="must be \\[3, h, w\\]"):
        render_attention_maps(image, {"single": torch.rand(2, 2, 3)}, boxes, torch.ones(3), torch.zeros(3))


def test_attention_figures_one_per_image_with_a_column_per_stream(tmp_path: Path) -> None:
    images, padding_mask, _ = toy_batch()
    for spec, columns in (({"variant": "conditional_detr"}, 1), ({"variant": "sd_detr"}, 2)):
        figures = attention_figures(_perturbed_model(**spec), images[:2], padding_mask[:2], num_detections=2)
        assert len(figures) == 2 and all(len(f.axes) == 2 * columns for f in figures)
        assert imread(save_png(figures[1], tmp_path / f"{spec['variant']}.png")).shape[1] == columns * 300


def test_attention_cells_cover_their_stride_whatever_the_padding() -> None:
    """Cell (i, j) is drawn over pixels [i s, (i + 1) s) x [j s, (j + 1) s), not stretched over the padded tensor."""
    hot = torch.zeros(1, 2, 2)
    hot[0, 0, 1] = 1.0  # the top-right cell of a 2 x 2 grid at stride 32: columns 32-63 of a 64 x 64 image
    on_pixels = attention_on_pixels(hot, (64, 64), stride=32)
    assert on_pixels.shape == (1, 64, 64)
    assert on_pixels[0, :32, 32:].mean() > 4 * on_pixels[0, :32, :32].mean()
    assert attention_on_pixels(hot, (64, 64), stride=(64, 128)).shape == (1, 64, 64)  # grid spanning 64 x 128
    with pytest.raises(ValueError, match="does not cover"):
        attention_on_pixels(hot, (80, 64), stride=32)


def test_attention_figure_of_an_image_is_the_same_padded_or_alone(tmp_path: Path) -> None:
    """The 96 x 96 toy image inside a tensor padded to 128 x 128 (as the first images of a val batch are) draws
    the same figure as on its own."""
    images, padding_mask, _ = toy_batch()
    model = _perturbed_model(variant="sd_detr")
    assert model.backbone.stride == 32 and padding_mask[3, 96:].all() and not padding_mask[3, :96, :96].any()
    padded = attention_figures(model, images[3:4], padding_mask[3:4], num_detections=2)[0]
    alone = attention_figures(model, images[3:4, :, :96, :96], padding_mask[3:4, :96, :96], num_detections=2)[0]
    drawn = [imread(save_png(figure, tmp_path / f"{name}.png")) for name, figure in (("p", padded), ("a", alone))]
    assert drawn[0].shape == drawn[1].shape
    assert abs(drawn[0] - drawn[1]).max() < 0.02
