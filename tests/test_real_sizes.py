"""The paper's geometry at real image sizes (issue 12): 300 slots on a stride-32 C5 map, images of 480x480
(225 cells), 800x1333 (1050 cells) and 32x32 (1 cell), alone and in mixed padded batches.

Covered: TAQ's fill slots train and predict; the encoder loss ignores fill slots; boxes and reference
points stay fp32 under bf16 autocast; the official initialisation; and an image's predictions do not
depend on its batch companions. The transformer is small (d_model 32) to keep the tests fast; the
backbone is ResNet-18, whose C5 geometry (stride 32, ceil) is ResNet-50's (checked below).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from sd_detr.backbone import ResNetBackbone
from sd_detr.box_ops import inverse_sigmoid
from sd_detr.config import BackboneConfig, DetectorConfig, read_config_file
from sd_detr.engine import build_criterion, build_optimizer, compute_loss, predict
from sd_detr.heads import Predictions
from sd_detr.model import Detector, build_detector
from sd_detr.postprocess import postprocess

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL_TRANSFORMER = {
    "d_model": 32, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 2, "ffn_dim": 64, "dropout": 0.0,
}  # fmt: skip


def paper_geometry(variant: str = "sd_detr", taq: bool = True, **overrides: object) -> DetectorConfig:
    """300 slots, 80 classes, ResNet-18 C5 (stride 32, frozen BN, layer4 trainable), small transformer."""
    model: dict[str, object] = {
        "variant": variant,
        "num_classes": 80,
        "num_queries": 300,
        "backbone": {"name": "resnet18", "trainable_layers": 1},
        "transformer": SMALL_TRANSFORMER,
    }
    if variant == "sd_detr":
        model["taq"] = taq
    model.update(overrides)
    return DetectorConfig.model_validate({"model": model})


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    """A normalized image [3, H, W]: smooth random blobs (not white noise, so features vary smoothly)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 3, max(height // 16, 1), max(width // 16, 1), generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]


def pad_batch(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left padding of [3, h_i, w_i] images into images [B, 3, H, W] and padding_mask [B, H, W]."""
    height = max(image.shape[1] for image in images)
    width = max(image.shape[2] for image in images)
    batch = torch.zeros(len(images), 3, height, width)
    mask = torch.ones(len(images), height, width, dtype=torch.bool)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]] = image
        mask[index, : image.shape[1], : image.shape[2]] = False
    return batch, mask


def targets_for(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(count):
        centers = torch.rand(3, 2, generator=generator) * 0.5 + 0.25
        sizes = torch.rand(3, 2, generator=generator) * 0.3 + 0.1
        targets.append(
            {"labels": torch.randint(0, 80, (3,), generator=generator), "boxes": torch.cat([centers, sizes], 1)}
        )
    return targets


# ---- geometry ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resnet18_and_resnet50_share_the_c5_geometry_and_masks_are_each_images_extent() -> None:
    torch.manual_seed(0)
    images, mask = pad_batch([random_image(96, 160, 0), random_image(480, 480, 1), random_image(32, 32, 2)])
    for name in ("resnet18", "resnet50"):
        backbone = ResNetBackbone(BackboneConfig(name=name)).eval()
        with torch.no_grad():
            out = backbone(images, mask)
        assert backbone.stride == 32 and out.features.shape[-2:] == (15, 15)
        extents = [((~m).any(1).sum().item(), (~m).any(0).sum().item()) for m in out.padding_mask]
        assert extents == [(3, 5), (15, 15), (1, 1)]  # ceil(h / 32), ceil(w / 32) of each image
        for index, m in enumerate(out.padding_mask):  # exactly the top-left rectangle, nothing else
            h, w = extents[index]
            assert not m[:h, :w].any() and int(m.sum()) == 15 * 15 - h * w
            assert not out.features[index][:, m].any()  # padded cells are zero


# ---- TAQ on small maps: trains a step and predicts ---------------------------------------------------------

LAYOUTS = {
    "480x480": ([(480, 480)], [225]),
    "800x1333+480x480": ([(800, 1333), (480, 480)], [300, 225]),
    "32x32": ([(32, 32)], [1]),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_taq_with_300_slots_trains_a_step_and_predicts(layout: str) -> None:
    sizes, expected_anchors = LAYOUTS[layout]
    config = paper_geometry()
    model = build_detector(config.model, seed=0)
    criterion = build_criterion(config)
    optimizer = build_optimizer(model, config.optimizer)
    images, mask = pad_batch([random_image(h, w, seed) for seed, (h, w) in enumerate(sizes)])
    targets = targets_for(len(sizes), seed=1)

    model.train()
    outputs, losses = compute_loss(model, criterion, images, mask, targets)
    assert outputs.logits.shape == (len(sizes), 300, 80) and outputs.boxes.shape == (len(sizes), 300, 4)
    assert outputs.encoder is not None and outputs.encoder.valid.sum(1).tolist() == expected_anchors
    assert torch.isfinite(losses.total)
    optimizer.zero_grad()
    losses.total.backward()
    generator = model.decoding.query_generator
    grads = {
        "mini-detector class head": generator.class_head.weight.grad,
        "mini-detector box head": generator.box_head.layers[-1].weight.grad,  # zero-init last layer: its grad
        "decoder": model.decoding.decoder.layers[-1].cls_cross.attn.v_proj.weight.grad,
        "box head": model.decoding.heads.box_head.layers[-1].weight.grad,
        "encoder": model.encoder.layers[0].self_attn.v_proj.weight.grad,
        "backbone layer4": model.backbone.layer4[-1].conv2.weight.grad,
    }
    if min(expected_anchors) < 300:
        grads["fill queries"] = generator.fill_cls_content.weight.grad
        grads["fill boxes"] = generator.fill_reference.weight.grad
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    optimizer.step()

    orig_sizes = torch.tensor(sizes)
    detections = predict(model, images, mask, orig_sizes)
    for (height, width), detection in zip(sizes, detections, strict=True):
        assert detection["boxes"].shape == (100, 4) and torch.isfinite(detection["scores"]).all()
        assert (detection["boxes"][:, 2] <= width).all() and (detection["boxes"][:, 3] <= height).all()


def test_encoder_loss_on_a_one_cell_map_is_the_loss_of_its_one_anchor() -> None:
    """32x32 image: 1 anchor, 299 fill slots. The encoder terms equal the criterion on the anchor alone,
    whatever the fill slots' encoder predictions hold."""
    config = paper_geometry()
    model = build_detector(config.model, seed=0).eval()
    criterion = build_criterion(config)
    images, mask = pad_batch([random_image(32, 32, 0), random_image(32, 32, 1)])
    targets = targets_for(2, seed=2)
    with torch.no_grad():
        encoder = model(images, mask).encoder
    assert encoder.valid[:, 0].all() and not encoder.valid[:, 1:].any()
    num_boxes = criterion.num_boxes(targets, images.device)
    masked = criterion.output_terms(encoder, targets, num_boxes, with_alignment=False)
    alone = criterion.output_terms(Predictions(encoder.logits[:, :1], encoder.boxes[:, :1]), targets, num_boxes, False)
    tampered = Predictions(torch.full_like(encoder.logits, 8.0), torch.full_like(encoder.boxes, 0.5), encoder.valid)
    tampered.logits[:, 0], tampered.boxes[:, 0] = encoder.logits[:, 0], encoder.boxes[:, 0]
    again = criterion.output_terms(tampered, targets, num_boxes, with_alignment=False)
    for name in ("class", "bbox", "giou"):
        assert torch.allclose(masked[name], alone[name], rtol=1e-6, atol=1e-7), name
        assert torch.allclose(again[name], alone[name], rtol=1e-6, atol=1e-7), name


# ---- fp32 boxes under autocast -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "taq"),
    [("conditional_detr", False), ("sd_detr", False), ("sd_detr", True)],
    ids=["cdetr", "sd", "sd-taq"],
)
def test_boxes_and_references_are_fp32_under_bf16_autocast(variant: str, taq: bool) -> None:
    model = build_detector(paper_geometry(variant, taq).model, seed=0).eval()
    with torch.no_grad():  # move the box head off its zero init so the offsets are not trivially zero
        for parameter in model.decoding.heads.box_head.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    images, mask = pad_batch([random_image(480, 480, 0), random_image(256, 320, 1)])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, mask)
    assert out.logits.dtype == torch.bfloat16  # autocast was on
    reference = out.decoder.reference
    assert reference.dtype == torch.float32
    for predictions in out.decoder_layers() + ([out.encoder] if out.encoder is not None else []):
        assert predictions.boxes.dtype == torch.float32
    hidden = out.decoder.extras.get("loc_hidden", out.decoder.hidden)  # the box head's input, [L, B, N, d]
    with torch.no_grad():
        offsets = model.decoding.heads.box_head(hidden.float())  # fp32, autocast off
        reference_logit = F.pad(inverse_sigmoid(reference), (0, 4 - reference.shape[-1]))
        expected = (offsets + reference_logit).sigmoid()
    assert (out.decoder.boxes - expected).abs().max() <= 1e-6
    assert not torch.equal(out.boxes, out.boxes.bfloat16().float())  # not rounded to bf16 anywhere


# ---- initialisation ------------------------------------------------------------------------------------------

TRANSFORMER_PREFIXES = (
    "encoder.",
    "decoding.decoder.",
    "decoding.ref_point_head.",
    "decoding.anchor_pos_head.",
    "decoding.query_generator.memory_proj.",
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "taq"),
    [("conditional_detr", False), ("sd_detr", False), ("sd_detr", True)],
    ids=["cdetr", "sd", "sd-taq"],
)
def test_official_initialisation_at_paper_sizes(variant: str, taq: bool) -> None:
    paper = {"d_model": 256, "num_heads": 8, "num_encoder_layers": 6, "num_decoder_layers": 6, "ffn_dim": 2048}
    model = build_detector(paper_geometry(variant, taq, transformer=paper).model, seed=0)
    prior_bias = -math.log((1 - 0.01) / 0.01)
    checked = 0
    for name, parameter in model.named_parameters():
        if not name.startswith(TRANSFORMER_PREFIXES) or parameter.dim() < 2:
            continue
        fan_out, fan_in = parameter.shape
        if ".self_attn." in name and name.startswith("encoder.") and not name.endswith("out_proj.weight"):
            fan_out *= 3  # q, k, v drawn as nn.MultiheadAttention's packed [3d, d] in_proj_weight
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert parameter.abs().max() <= bound, name
        assert parameter.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name
        checked += 1
    assert checked > 50
    for name, module in model.named_modules():
        if name.endswith(("self_attn", "attn")) and hasattr(module, "out_proj"):
            assert not module.out_proj.bias.any(), name
    for projection in ("q_proj", "k_proj", "v_proj"):
        assert not getattr(model.encoder.layers[0].self_attn, projection).bias.any()
    heads = [model.decoding.heads]
    if taq:
        heads.append(model.decoding.query_generator)
    for head in heads:
        assert torch.allclose(head.class_head.bias, torch.full_like(head.class_head.bias, prior_bias))
        assert not head.box_head.layers[-1].weight.any() and not head.box_head.layers[-1].bias.any()
    if not taq:  # learned query embeddings keep nn.Embedding's N(0, 1), as the official query_embed
        assert model.decoding.query_pos.weight.std().item() == pytest.approx(1.0, rel=0.1)


# ---- predictions independent of batch companions -------------------------------------------------------------


def assert_same_detections(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor], atol: float) -> None:
    """The same set of detections up to float noise (near-tied scores may swap order): optimal one-to-one
    pairing on label, score and box, then every pair must agree."""
    assert first["scores"].shape == second["scores"].shape
    cost = (first["scores"][:, None] - second["scores"][None, :]).abs() * 1e3
    cost = cost + (first["boxes"][:, None] - second["boxes"][None, :]).abs().amax(-1)
    cost = torch.where(first["labels"][:, None] == second["labels"][None, :], cost, torch.full_like(cost, 1e9))
    rows, cols = linear_sum_assignment(cost.numpy())
    assert np.array_equal(rows, np.arange(len(rows)))
    assert torch.equal(first["labels"][rows], second["labels"][cols])
    assert (first["scores"][rows] - second["scores"][cols]).abs().max() <= atol
    assert (first["boxes"][rows] - second["boxes"][cols]).abs().max() <= 1e-2  # pixels


def assert_alone_equals_in_company(model: Detector, image: torch.Tensor, companions: list[torch.Tensor]) -> None:
    height, width = image.shape[1:]
    with torch.no_grad():
        alone = model(*pad_batch([image]))
        alone_detections = postprocess(alone.logits, alone.boxes, torch.tensor([[height, width]]))[0]
        for companion in companions:
            for position in (0, 1):
                batch = [companion, image] if position else [image, companion]
                out = model(*pad_batch(batch))
                assert (out.logits[position] - alone.logits[0]).abs().max() <= 1e-4
                assert (out.boxes[position] - alone.boxes[0]).abs().max() <= 1e-4
                sizes = torch.tensor([list(b.shape[1:]) for b in batch])
                detections = postprocess(out.logits, out.boxes, sizes)[position]
                assert_same_detections(alone_detections, detections, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["frozen_batchnorm", "group_norm"])
@pytest.mark.parametrize(
    ("variant", "taq"),
    [("conditional_detr", False), ("sd_detr", False), ("sd_detr", True)],
    ids=["cdetr", "sd", "sd-taq"],
)
def test_predictions_do_not_depend_on_batch_companions(variant: str, taq: bool, norm: str) -> None:
    """An image alone vs. beside a larger and a smaller image (first or second in the batch): logits and
    boxes within 1e-4, the same detections. Small images and 20 slots keep it fast; the real sizes follow."""
    backbone = {"name": "resnet18", "norm": norm, "trainable_layers": 5 if norm == "group_norm" else 1}
    config = paper_geometry(variant, taq, num_queries=20, num_classes=4, backbone=backbone)
    model = build_detector(config.model, seed=0).eval()
    image = random_image(160, 224, 0)
    assert_alone_equals_in_company(model, image, [random_image(256, 320, 1), random_image(64, 96, 2)])


@pytest.mark.slow
def test_real_size_predictions_do_not_depend_on_batch_companions() -> None:
    """A 480x480 image (225 cells < 300 slots) alone vs. beside an 800x1333 and a 32x32 image, SD-DETR + TAQ."""
    model = build_detector(paper_geometry().model, seed=0).eval()
    assert_alone_equals_in_company(
        model, random_image(480, 480, 0), [random_image(800, 1333, 1), random_image(32, 32, 2)]
    )


@pytest.mark.slow
def test_coco_r50_model_on_mixed_real_sizes() -> None:
    """configs/coco_r50.yaml's model (ResNet-50 C5, 300 slots; transformer shrunk) on an 800x1333 + 480x480
    batch and a 32x32 image: a training step and predictions."""
    raw = read_config_file(CONFIGS / "coco_r50.yaml")
    raw["model"]["transformer"] = SMALL_TRANSFORMER
    config = DetectorConfig.model_validate({key: raw[key] for key in ("model", "matcher", "loss", "optimizer")})
    assert config.model.backbone.name == "resnet50" and config.model.num_queries == 300
    model = build_detector(config.model, seed=0)
    criterion = build_criterion(config)
    for sizes in ([(800, 1333), (480, 480)], [(32, 32)]):
        images, mask = pad_batch([random_image(h, w, seed) for seed, (h, w) in enumerate(sizes)])
        model.train()
        outputs, losses = compute_loss(model, criterion, images, mask, targets_for(len(sizes), seed=3))
        assert torch.isfinite(losses.total)
        losses.total.backward()
        assert model.backbone.layer4[-1].conv3.weight.grad.abs().sum() > 0
        assert outputs.encoder.valid.sum(1).tolist() == [
            min(300, math.ceil(h / 32) * math.ceil(w / 32)) for h, w in sizes
        ]
        detections = predict(model, images, mask, torch.tensor(sizes))
        assert all(d["boxes"].shape == (100, 4) for d in detections)
