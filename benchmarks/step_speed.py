"""Training-step and inference speed of our detectors against Hugging Face transformers' ConditionalDetr.

Builds, with the same dimensions, backbone, image size and batch:
  - ours ``conditional_detr`` (the baseline; the same computation as HF's, see tests/test_parity_hf.py),
  - ours ``sd_detr`` with TAQ on and off (more work by design: two cross-attention/FFN streams, 2N
    self-attention tokens, the TAQ mini-detector and its extra loss output),
  - HF ``ConditionalDetrForObjectDetection`` (random init, built offline).

What is timed (``--scope``):
  - ``transformer`` (default): everything after the backbone. Our torchvision ResNet runs once, outside the
    timing; its features [B, C, h, w] and grid mask feed ``Detector.forward_features`` and HF's model, whose
    backbone is replaced by a pass-through of those features. Timed: position embedding, 1x1 projection,
    encoder, decoder (+ TAQ), heads, and for training the set loss (Hungarian matching on every decoder
    layer, aux losses on) and the backward pass.
  - ``full``: the same plus the backbone: images [B, 3, H, W] in, HF's backbone replaced by a copy of ours
    (same torchvision ResNet, frozen BatchNorm, stem + layer1 frozen).
Training step = zero grads + forward + loss + backward (no optimizer step: its cost only depends on the
parameter count). Ours uses ``SetCriterion``, HF its own loss (``labels=``, auxiliary_loss on; same costs
and weights). Inference = eval-mode forward under ``torch.no_grad`` (no post-processing). The models are
timed interleaved (each repeat runs every model once, in a rotating order) so machine noise hits them alike.
Reported: median and min over the repeats; ``ratio`` = median over repeats of ours / HF within the same
repeat (robust to load that comes and goes on a shared machine), ``ratio of min`` = our min / HF's min.

Peak memory = the most memory allocated during one step above what was allocated before it (parameters
and inputs excluded): CUDA ``torch.cuda.max_memory_allocated``; CPU the peak bytes of live tensor storages
created during the step, tracked with a ``TorchDispatchMode`` (process RSS would be blurred by the CPU
allocator's caching and by the other models in this process).

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one training step (forward + backward) and one
inference forward: matmul/attention/conv FLOPs of the transformer part (1x1 projection + encoder + decoder
(+ TAQ) + heads; the loss adds no counted ops; with ``--scope full`` the backbone's own count is
subtracted). TFLOP/s (``transformer`` scope only) = those FLOPs / the median time, which includes the
Hungarian matching and loss, so it is a lower bound of the rate the transformer layers run at.

    python benchmarks/step_speed.py                         # CPU, fp32, small sizes (~2 min on 2 cores)
    python benchmarks/step_speed.py --device cuda --dtype bf16 --batch 8 --image-size 800 --d-model 256 \\
        --layers 6 --queries 300 --backbone resnet50
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from torch.utils.weak import WeakIdKeyDictionary

from sd_detr.config import DetectorConfig
from sd_detr.engine import build_criterion
from sd_detr.model import Detector, build_detector

Inputs = tuple[Tensor, Tensor]  # (features or images, padding mask True = padded)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast for all models")
    parser.add_argument("--scope", choices=["transformer", "full"], default="transformer")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=512, help="square input side in pixels")
    parser.add_argument("--backbone", choices=["resnet18", "resnet34", "resnet50", "resnet101"], default="resnet18")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--ffn-dim", type=int, default=None, help="default 8 * d_model (the paper's 2048 / 256)")
    parser.add_argument("--layers", type=int, default=3, help="encoder layers = decoder layers")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--objects", type=int, default=6, help="ground-truth boxes per image")
    parser.add_argument("--dropout", type=float, default=0.1, help="attention, residual and FFN dropout (all models)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


# ---- models ---------------------------------------------------------------------------------------------


def our_config(args: argparse.Namespace, variant: str, taq: bool) -> DetectorConfig:
    return DetectorConfig.model_validate({
        "model": {
            "variant": variant, "num_classes": args.classes, "num_queries": args.queries,
            "backbone": {"name": args.backbone},
            "transformer": {
                "d_model": args.d_model, "num_heads": args.heads, "num_encoder_layers": args.layers,
                "num_decoder_layers": args.layers, "ffn_dim": args.ffn_dim or 8 * args.d_model,
                "dropout": args.dropout,
            },
        } | ({"taq": taq} if variant == "sd_detr" else {}),  # the baseline has no TAQ switch
    })  # fmt: skip


class PassThroughBackbone(nn.Module):
    """Stands in for HF's backbone: the "pixel values" are already backbone features [B, C, h, w] and the
    pixel mask the grid mask [B, h, w] (1 = valid), returned as HF's single feature level."""

    def forward(self, features: Tensor, valid_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(features, valid_mask.bool())]


class SharedResNet(nn.Module):
    """Stands in for HF's backbone with (a copy of) our torchvision ResNet; pixel mask 1 = valid."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.body = backbone

    def forward(self, images: Tensor, valid_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        feature_map = self.body(images, ~valid_mask.bool())
        return [(feature_map.features, ~feature_map.padding_mask)]


def build_hf(args: argparse.Namespace, ours: Detector) -> nn.Module:
    """HF ConditionalDetrForObjectDetection with our dimensions; its backbone replaced per ``--scope``."""
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ResNetConfig

    t = ours.config.transformer
    channels = ours.backbone.num_channels
    config = ConditionalDetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        backbone_config=ResNetConfig(depths=[1] * 4, hidden_sizes=[16, 16, 16, channels], embedding_size=16,
                                     out_features=["stage4"]),
        d_model=t.d_model, encoder_layers=t.num_encoder_layers, decoder_layers=t.num_decoder_layers,
        encoder_attention_heads=t.num_heads, decoder_attention_heads=t.num_heads,
        encoder_ffn_dim=t.ffn_dim, decoder_ffn_dim=t.ffn_dim,
        num_queries=ours.config.num_queries, num_labels=ours.config.num_classes, auxiliary_loss=True,
        dropout=t.dropout, attention_dropout=t.dropout, activation_dropout=t.dropout,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = ConditionalDetrForObjectDetection(config)
    model.model.backbone = PassThroughBackbone() if args.scope == "transformer" else SharedResNet(
        copy.deepcopy(ours.backbone)
    )  # fmt: skip
    return model


def transformer_parameters(model: nn.Module) -> int:
    """Trainable parameters outside the backbone."""
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "backbone" not in n)


# ---- inputs ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: Tensor  # [B, 3, H, W]
    padding_mask: Tensor  # [B, H, W] True = padded
    features: Tensor  # [B, C, h, w] from our backbone
    grid_mask: Tensor  # [B, h, w] True = padded
    targets: list[dict[str, Tensor]]  # ours: labels, boxes normalized cxcywh
    hf_labels: list[dict[str, Tensor]]  # HF: class_labels, boxes


def make_batch(args: argparse.Namespace, backbone: nn.Module, device: torch.device) -> Batch:
    """Random images (the last one padded on the right by a quarter) and random boxes."""
    generator = torch.Generator().manual_seed(args.seed)
    size = args.image_size
    images = torch.randn(args.batch, 3, size, size, generator=generator)
    padding_mask = torch.zeros(args.batch, size, size, dtype=torch.bool)
    padding_mask[-1, :, size - size // 4 :] = True
    images[padding_mask[:, None].expand_as(images)] = 0
    targets = []
    for _ in range(args.batch):
        centers = torch.rand(args.objects, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(args.objects, 2, generator=generator) * 0.3 + 0.05
        labels = torch.randint(0, args.classes, (args.objects,), generator=generator)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centers, sizes], 1).to(device)})
    images, padding_mask = images.to(device), padding_mask.to(device)
    with torch.no_grad():
        feature_map = backbone(images, padding_mask)
    return Batch(
        images=images,
        padding_mask=padding_mask,
        features=feature_map.features,
        grid_mask=feature_map.padding_mask,
        targets=targets,
        hf_labels=[{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets],
    )


# ---- one model under test -------------------------------------------------------------------------------


@dataclass
class Candidate:
    """A model under test: ``train_loss(inputs)`` -> scalar loss, ``infer(inputs)`` -> outputs."""

    name: str
    model: nn.Module
    train_loss: Callable[[Inputs], Tensor]
    infer: Callable[[Inputs], object]
    is_reference: bool = False


def our_candidate(name: str, config: DetectorConfig, batch: Batch, scope: str, device: torch.device) -> Candidate:
    model = build_detector(config.model, seed=0).to(device)
    criterion = build_criterion(config)

    def forward(inputs: Inputs):
        return model.forward_features(*inputs) if scope == "transformer" else model(*inputs)

    def train_loss(inputs: Inputs) -> Tensor:
        outputs = forward(inputs)
        return criterion(outputs.decoder_layers(), batch.targets, outputs.encoder).total

    return Candidate(name, model, train_loss, forward)


def hf_candidate(args: argparse.Namespace, ours: Detector, batch: Batch, device: torch.device) -> Candidate:
    model = build_hf(args, ours).to(device)

    def train_loss(inputs: Inputs) -> Tensor:
        return model(pixel_values=inputs[0], pixel_mask=(~inputs[1]).long(), labels=batch.hf_labels).loss

    def infer(inputs: Inputs):
        return model(pixel_values=inputs[0], pixel_mask=(~inputs[1]).long())

    return Candidate("hf ConditionalDetr", model, train_loss, infer, is_reference=True)


# ---- measurement ----------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def training_step(candidate: Candidate, inputs: Inputs, device: torch.device, dtype: str) -> None:
    candidate.model.zero_grad(set_to_none=True)
    with autocast(device, dtype):
        loss = candidate.train_loss(inputs)
    loss.backward()


def inference(candidate: Candidate, inputs: Inputs, device: torch.device, dtype: str, no_grad: bool = True) -> None:
    with torch.set_grad_enabled(not no_grad), autocast(device, dtype):
        candidate.infer(inputs)


def time_interleaved(
    candidates: list[Candidate], run: Callable[[Candidate], None], repeats: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of ``run(candidate)`` for each repeat. Every repeat runs each candidate once, starting
    one candidate later each time, so a candidate never always follows the same one."""
    times: dict[str, list[float]] = {c.name: [] for c in candidates}
    for index in range(warmup + repeats):
        shift = index % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            synchronize(device)
            start = time.perf_counter()
            run(candidate)
            synchronize(device)
            if index >= warmup:
                times[candidate.name].append(time.perf_counter() - start)
    return times


class AllocationTracker(TorchDispatchMode):
    """Bytes of the tensor storages created while the mode is active and still alive, and their peak.

    Every op's output storage is counted once when it appears and uncounted when it is freed (a weakref
    finalizer on the storage), so CPU allocator caching does not blur the figure; backward ops run under the
    mode too. Pre-existing tensors (parameters, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.device.type == "cpu":
                storage = tensor.untyped_storage()
                if storage not in self._seen:
                    self._seen[storage] = storage.nbytes()
                    weakref.finalize(storage, self._free, storage.nbytes())
                    self.live_bytes += storage.nbytes()
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


def peak_memory_bytes(run: Callable[[], None], device: torch.device) -> float:
    """Most bytes allocated during ``run()`` above those allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    tracker = AllocationTracker()
    with tracker:
        run()
    return float(tracker.peak_bytes)


def _cpu_attention_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs):
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# CPU fused attention kernels are missing from FlopCounterMode's table: count them like the CUDA ones.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(run: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        run()
    return counter.get_total_flops()


# ---- main -----------------------------------------------------------------------------------------------


@dataclass
class PhaseResult:
    """One model in one phase (training step or inference): times [s], peak bytes, FLOPs."""

    seconds: list[float]
    peak_bytes: float
    flops: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    def paired_ratio(self, reference: PhaseResult) -> float:
        """Median over repeats of this time / the reference's time in the same repeat (noise that lasts
        longer than one repeat cancels)."""
        return statistics.median(t / r for t, r in zip(self.seconds, reference.seconds, strict=True))


def measure_phase(
    candidates: list[Candidate],
    run: Callable[[Candidate, Inputs], None],
    count: Callable[[Candidate, Inputs], None],
    inputs: Inputs,
    backbone_flops: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, PhaseResult]:
    """Interleaved timing of ``run`` on ``inputs``, then peak memory (``run``) and FLOPs (``count``, minus the
    backbone's ``backbone_flops`` when it is part of the run) from one extra call each."""
    times = time_interleaved(candidates, lambda c: run(c, inputs), args.repeats, args.warmup, device)
    return {
        c.name: PhaseResult(
            seconds=times[c.name],
            peak_bytes=peak_memory_bytes(lambda c=c: run(c, inputs), device),
            flops=count_flops(lambda c=c: count(c, inputs)) - backbone_flops,
        )
        for c in candidates
    }


def backbone_flops(backbone: nn.Module, batch: Batch, train: bool) -> int:
    """FLOPs of our backbone on the batch: forward, plus backward into its trainable stages when ``train``."""
    backbone = copy.deepcopy(backbone).train(train)

    def run() -> None:
        with torch.set_grad_enabled(train):
            features = backbone(batch.images, batch.padding_mask).features
        if train:
            features.sum().backward()

    return count_flops(run)


def print_table(title: str, results: dict[str, PhaseResult], reference: str, with_rate: bool) -> None:
    header = (
        f"{'model':<24}{'median ms':>11}{'min ms':>9}{'ratio':>7}{'ratio of min':>14}{'peak MiB':>10}{'GFLOP':>8}"
        + (f"{'TFLOP/s':>9}" if with_rate else "")
    )
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    base = results[reference]
    for name, result in results.items():
        row = (
            f"{name:<24}{result.median * 1e3:>11.1f}{result.best * 1e3:>9.1f}{result.paired_ratio(base):>7.2f}"
            f"{result.best / base.best:>14.2f}{result.peak_bytes / 2**20:>10.1f}{result.flops / 1e9:>8.2f}"
        )
        print(row + (f"{result.flops / result.median / 1e12:>9.4f}" if with_rate else ""))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    baseline_config = our_config(args, "conditional_detr", taq=False)
    backbone = build_detector(baseline_config.model, seed=0).backbone.to(device).eval()
    batch = make_batch(args, backbone, device)
    if args.queries > int((~batch.grid_mask).flatten(1).sum(1).min()):
        raise SystemExit(f"--queries {args.queries} exceeds the valid feature cells of an image; raise --image-size")
    with_backbone = args.scope == "full"
    inputs: Inputs = (batch.images, batch.padding_mask) if with_backbone else (batch.features, batch.grid_mask)

    baseline = our_candidate("ours conditional_detr", baseline_config, batch, args.scope, device)
    reference = hf_candidate(args, baseline.model, batch, device)
    candidates = [
        baseline,
        our_candidate("ours sd_detr (taq)", our_config(args, "sd_detr", taq=True), batch, args.scope, device),
        our_candidate("ours sd_detr (no taq)", our_config(args, "sd_detr", taq=False), batch, args.scope, device),
        reference,
    ]
    if transformer_parameters(baseline.model) != transformer_parameters(reference.model):
        raise SystemExit("ours conditional_detr and HF differ in parameter count: not the same model")

    height, width = batch.grid_mask.shape[-2:]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    timed = (
        "everything after the backbone (our ResNet's features precomputed, HF's backbone a pass-through)"
        if args.scope == "transformer"
        else "backbone + everything after it (HF's backbone replaced by a copy of our ResNet)"
    )
    print(
        f"device {device} ({hardware}), dtype {args.dtype}, torch {torch.__version__}, "
        f"HF attention {reference.model.config._attn_implementation}\n"
        f"batch {args.batch} x {args.image_size}x{args.image_size} (last image padded 1/4), {args.backbone} -> "
        f"{height}x{width} cells, d_model {args.d_model}, heads {args.heads}, ffn {args.ffn_dim or 8 * args.d_model}, "
        f"{args.layers}+{args.layers} layers, {args.queries} queries, {args.classes} classes, "
        f"{args.objects} boxes/image, dropout {args.dropout}\n"
        f"params outside the backbone: "
        + ", ".join(f"{c.name} {transformer_parameters(c.model) / 1e6:.2f}M" for c in candidates)
        + f"\ntimed: {timed}; {args.repeats} interleaved repeats after {args.warmup} warm-up"
    )

    for candidate in candidates:
        candidate.model.train()
    train = measure_phase(
        candidates,
        lambda c, x: training_step(c, x, device, args.dtype),
        lambda c, x: training_step(c, x, device, args.dtype),
        inputs,
        backbone_flops(backbone, batch, train=True) if with_backbone else 0,
        args,
        device,
    )
    for candidate in candidates:
        candidate.model.eval()
    infer = measure_phase(
        candidates,
        lambda c, x: inference(c, x, device, args.dtype),
        # FlopCounterMode's module tracker trips over no_grad views of parameters: count with grad on (same ops)
        lambda c, x: inference(c, x, device, args.dtype, no_grad=False),
        inputs,
        backbone_flops(backbone, batch, train=False) if with_backbone else 0,
        args,
        device,
    )
    with_rate = not with_backbone
    print_table("training step (zero grads + forward + loss + backward)", train, reference.name, with_rate)
    print_table("inference (eval forward, no_grad)", infer, reference.name, with_rate)
    memory_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensor storages"
    print(
        f"\nratio = median over repeats of ours / {reference.name} in the same repeat; ratio of min = min / min; "
        "both from this run. peak MiB = most allocated during one call above the "
        f"memory before it ({memory_kind}). GFLOP = FlopCounterMode on the transformer part (projection, "
        "encoder, decoder, heads; forward + backward for training)"
        + (". TFLOP/s = GFLOP / median time." if with_rate else "; no TFLOP/s: the backbone is timed, not counted.")
    )


if __name__ == "__main__":
    main()
