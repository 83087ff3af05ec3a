"""Opt-in ``torch.compile`` of the transformer (`sd_detr.engine.compile_transformer`, ``training.compile``):
the compiled detector trains with the eager detector's loss and gradients, across batch and image sizes."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch._dynamo.utils import counters

from pipelines.ddp import build_worker_detector
from sd_detr.config import DetectorConfig
from sd_detr.engine import build_criterion, compile_transformer, compute_loss
from sd_detr.losses import SetCriterion
from sd_detr.model import Detector, build_detector
from tests.toy_data import toy_batch


def tiny_config() -> DetectorConfig:
    return DetectorConfig.model_validate({
        "model": {
            "variant": "sd_detr", "num_classes": 3, "num_queries": 6, "backbone": {"name": "resnet10"},
            "transformer": {"d_model": 32, "num_heads": 4, "num_encoder_layers": 1, "num_decoder_layers": 2,
                            "ffn_dim": 64, "dropout": 0.0},
        },
    })  # fmt: skip


def loss_and_gradients(
    model: Detector, criterion: SetCriterion, images: Tensor, padding_mask: Tensor, targets: list[dict[str, Tensor]]
) -> tuple[Tensor, dict[str, Tensor]]:
    """One training forward + backward: (total loss, gradient of every parameter by name)."""
    model.train()
    model.zero_grad(set_to_none=True)
    _, losses = compute_loss(model, criterion, images, padding_mask, targets)
    losses.total.backward()
    return losses.total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_training_compile_compiles_the_workers_transformer_and_leaves_the_backbone_eager() -> None:
    """What ``training.compile`` sets in each Ray Train worker (`pipelines.worker`): the encoder and decoding are
    compiled in place (nn.Module.compile), the backbone is not; off by default."""
    compiled = build_worker_detector(tiny_config().model, seed=0, rank=0, compile=True)
    assert compiled.encoder._compiled_call_impl is not None and compiled.decoding._compiled_call_impl is not None
    assert compiled.backbone._compiled_call_impl is None
    eager = build_worker_detector(tiny_config().model, seed=0, rank=0)
    assert all(module._compiled_call_impl is None for module in eager.modules())
    assert list(compiled.state_dict()) == list(eager.state_dict())


@pytest.mark.slow  # compiling forward and backward on CPU takes about a minute
def test_compiled_transformer_gives_the_eager_loss_and_gradients() -> None:
    config = tiny_config()
    eager = build_detector(config.model, seed=0)
    # Off the initial weights: there TAQ samples exactly at cell centres, a kink of bilinear sampling whose
    # one-sided gradient (of the point offsets) flips with any change of float rounding, compiled or not.
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in eager.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    compiled = build_detector(config.model, seed=0)
    compiled.load_state_dict(eager.state_dict())
    compile_transformer(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints and DDP see the same names
    criterion = build_criterion(config)
    images, padding_mask, targets = toy_batch()
    # a second batch of another size (3 images, 96 px): dynamic shapes, no recompilation
    batches = [(images, padding_mask, targets), (images[:3, :, :96, :96], padding_mask[:3, :96, :96], targets[:3])]
    counters.clear()
    graphs = []
    for batch in batches:
        expected_loss, expected_grads = loss_and_gradients(eager, criterion, *batch)
        loss, grads = loss_and_gradients(compiled, criterion, *batch)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.allclose(loss, expected_loss, rtol=1e-4, atol=1e-4), (float(loss), float(expected_loss))
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, expected_grads[name], rtol=1e-3, atol=1e-4), name
    assert graphs[0] >= 2 and not counters["graph_break"]  # encoder and decoding really compiled, each whole
    assert graphs[1] == graphs[0]  # the second size reused the dynamic-shape graphs
