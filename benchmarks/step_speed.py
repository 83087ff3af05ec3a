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
With ``--scope full`` it also prints training images/s per device (batch / median step), their paired ratio
to HF's, and the hours of ``--estimate-epochs`` COCO train2017 epochs on ``--estimate-gpus`` such devices at
that rate (``throughput.py``; steps only, perfect scaling). ``--train-only`` skips inference and
``--without-ablation`` leaves out ``sd_detr (no taq)`` (fewer compilations on a GPU lease).

Peak memory = the most memory allocated during one step above what was allocated before it (parameters
and inputs excluded): CUDA ``torch.cuda.max_memory_allocated``; CPU the peak bytes of live tensor storages
created during the step, tracked with a ``TorchDispatchMode`` (process RSS would be blurred by the CPU
allocator's caching and by the other models in this process).

FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one training step (forward + backward) and one
inference forward: matmul/attention/conv FLOPs of the transformer part (1x1 projection + encoder + decoder
(+ TAQ) + heads; the loss adds no counted ops; with ``--scope full`` the backbone's own count is
subtracted). TFLOP/s (``transformer`` scope only) = those FLOPs / the median time, which includes the
Hungarian matching and loss, so it is a lower bound of the rate the transformer layers run at.

``--compile``: our models' encoder and decoder run ``torch.compile``'d (``sd_detr.engine.compile_transformer``,
as ``training.compile`` does in training); HF's model stays eager. Compilation happens in the warm-up calls
(train mode, then again for inference). FLOPs, and peak memory on CPU, are measured under a dispatch mode,
which runs compiled code eagerly: the same computation, the eager figure (CUDA peak memory is the compiled one).

The measurement tools live beside this runner: `step_timing.py` (interleaved timing), `step_memory.py`
(peak memory), `flop_count.py` (FLOPs), `step_models.py` (our models, the batch) and `hf_shims.py` (HF's).

    python benchmarks/step_speed.py                         # CPU, fp32, small sizes (~2 min on 2 cores)
    python benchmarks/step_speed.py --device cuda --dtype bf16 --batch 8 --image-size 800 --d-model 256 \\
        --layers 6 --queries 300 --backbone resnet50
    python benchmarks/step_speed.py --compile                # our transformer torch.compile'd
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from flop_count import backbone_flops, count_flops
from hf_shims import hf_candidate
from step_memory import peak_memory_bytes
from step_models import Candidate, Inputs, make_batch, our_candidate, our_config, transformer_parameters
from step_timing import PhaseResult, time_interleaved
from throughput import COCO_TRAIN_IMAGES, images_per_second, schedule_estimate

from sd_detr.model import build_detector


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
    parser.add_argument(
        "--layers", type=int, default=3,
        help="encoder layers = decoder layers, at least 2 (with one, HF keeps a query-scale MLP that ours, like its "
             "first layer, has no use for: not the same model)",
    )  # fmt: skip
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--objects", type=int, default=6, help="ground-truth boxes per image")
    parser.add_argument("--dropout", type=float, default=0.1, help="attention, residual and FFN dropout (all models)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true", help="torch.compile our encoder + decoder (HF stays eager)")
    parser.add_argument(
        "--without-ablation", action="store_true", help="leave out ours sd_detr (no taq): one compile fewer on a GPU"
    )
    parser.add_argument("--train-only", action="store_true", help="time training steps only, no inference")
    parser.add_argument("--estimate-gpus", type=int, default=8, help="GPUs of the schedule estimate (--scope full)")
    parser.add_argument(
        "--estimate-epochs", type=int, default=50, help="epochs of the schedule estimate (--scope full)"
    )
    args = parser.parse_args(argv)
    if args.layers < 2:
        parser.error("--layers must be at least 2")
    return args


# ---- measurement ----------------------------------------------------------------------------------------


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


# ---- main -----------------------------------------------------------------------------------------------


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


def print_table(
    title: str, results: dict[str, PhaseResult], reference: str, with_rate: bool, ours_baseline: str
) -> None:
    """One phase's table: per model its median and min time, the paired ratio to ``reference`` (HF) and to
    ``ours_baseline`` (our Conditional DETR: SD-DETR's own cost over its baseline), memory, FLOPs."""
    header = (
        f"{'model':<24}{'median ms':>11}{'min ms':>9}{'ratio':>7}{'ratio of min':>14}{'x ours base':>13}"
        f"{'peak MiB':>10}{'GFLOP':>8}" + (f"{'TFLOP/s':>9}" if with_rate else "")
    )
    print(f"\n{title}\n{header}\n{'-' * len(header)}")
    base, ours = results[reference], results[ours_baseline]
    for name, result in results.items():
        row = (
            f"{name:<24}{result.median * 1e3:>11.1f}{result.best * 1e3:>9.1f}{result.paired_ratio(base):>7.2f}"
            f"{result.best / base.best:>14.2f}{result.paired_ratio(ours):>13.2f}"
            f"{result.peak_bytes / 2**20:>10.1f}{result.flops / 1e9:>8.2f}"
        )
        print(row + (f"{result.flops / result.median / 1e12:>9.4f}" if with_rate else ""))


def print_throughput(results: dict[str, PhaseResult], reference: str, args: argparse.Namespace) -> None:
    """Training images/s per device of each model (batch / median step), its ratio to the reference's
    images/s (paired: 1 / the time ratio), and the wall time of ``--estimate-epochs`` COCO train2017 epochs on
    ``--estimate-gpus`` such devices at that rate (perfect scaling, steps only: a lower bound)."""
    base = results[reference]
    print(
        f"\ntraining throughput per device, and {args.estimate_epochs} epochs of COCO train2017 "
        f"({COCO_TRAIN_IMAGES} images) on {args.estimate_gpus} such devices (steps only, perfect scaling)"
    )
    header = f"{'model':<24}{'images/s':>10}{'x ' + reference:>28}{'hours':>8}"
    print(f"{header}\n{'-' * len(header)}")
    for name, result in results.items():
        rate = images_per_second(args.batch, result.median)
        estimate = schedule_estimate(rate, args.estimate_gpus, args.estimate_epochs)
        print(f"{name:<24}{rate:>10.1f}{1.0 / result.paired_ratio(base):>28.2f}{estimate.hours:>8.1f}")


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

    scope, compiled = args.scope, args.compile
    baseline = our_candidate("ours conditional_detr", baseline_config, batch, scope, device, compiled)
    reference = hf_candidate(args, baseline.model, batch, device)
    candidates = [
        baseline,
        our_candidate("ours sd_detr (taq)", our_config(args, "sd_detr", taq=True), batch, scope, device, compiled),
    ]
    if not args.without_ablation:
        no_taq = our_config(args, "sd_detr", taq=False)
        candidates.append(our_candidate("ours sd_detr (no taq)", no_taq, batch, scope, device, compiled))
    candidates.append(reference)
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
        + ("; ours torch.compile'd (encoder + decoder), HF eager" if compiled else "")
    )

    for candidate in candidates:
        candidate.model.train()
    train = measure_phase(
        candidates,
        lambda c, x: training_step(c, x, device, args.dtype),
        lambda c, x: training_step(c, x, device, args.dtype),
        inputs,
        backbone_flops(backbone, batch.images, batch.padding_mask, train=True) if with_backbone else 0,
        args,
        device,
    )
    with_rate = not with_backbone
    print_table(
        "training step (zero grads + forward + loss + backward)", train, reference.name, with_rate, baseline.name
    )
    if with_backbone:
        print_throughput(train, reference.name, args)
    if not args.train_only:
        for candidate in candidates:
            candidate.model.eval()
        infer = measure_phase(
            candidates,
            lambda c, x: inference(c, x, device, args.dtype),
            # FlopCounterMode's module tracker trips over no_grad views of parameters: count with grad on (same ops)
            lambda c, x: inference(c, x, device, args.dtype, no_grad=False),
            inputs,
            backbone_flops(backbone, batch.images, batch.padding_mask, train=False) if with_backbone else 0,
            args,
            device,
        )
        print_table("inference (eval forward, no_grad)", infer, reference.name, with_rate, baseline.name)
    memory_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "live tensor storages"
    print(
        f"\nratio = median over repeats of ours / {reference.name} in the same repeat; ratio of min = min / min; "
        f"x ours base = the same paired median against {baseline.name} (SD-DETR's cost over its own baseline); "
        "all from this run. peak MiB = most allocated during one call above the "
        f"memory before it ({memory_kind}). GFLOP = FlopCounterMode on the transformer part (projection, "
        "encoder, decoder, heads; forward + backward for training)"
        + (". TFLOP/s = GFLOP / median time." if with_rate else "; no TFLOP/s: the backbone is timed, not counted.")
    )


if __name__ == "__main__":
    main()
