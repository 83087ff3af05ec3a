"""The Ray Train worker loop: DDP training, rank-0 COCO evaluation, checkpoints, rank-0 MLflow logging."""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
from torch.nn.parallel import DistributedDataParallel

from pipelines.config import TrainJobConfig
from pipelines.ray_data import iter_detection_batches
from pipelines.reporting import log_evaluation_artifacts
from pipelines.tracking import client_for, log_metrics
from sd_detr.data.collate import DetectionBatch
from sd_detr.data.meta import load_meta
from sd_detr.diagnostics import attention_figures, score_iou_alignment, targets_to_pixel_xyxy
from sd_detr.engine import build_criterion, build_lr_scheduler, build_optimizer, predict, train_step
from sd_detr.evaluation import CocoEvaluator, coco_from_dict
from sd_detr.model import Detector, build_detector

CHECKPOINT_FILE = "state.pt"


def unwrap(model: torch.nn.Module) -> Detector:
    """The detector inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def mean_over_workers(count: torch.Tensor) -> torch.Tensor:
    """Number-of-boxes normalizer for DDP: the mean of ``count`` over all ranks."""
    if not distributed():
        return count
    count = count.clone()
    dist.all_reduce(count)
    return count / dist.get_world_size()


def synchronized_batches(batches: Iterable[DetectionBatch], device: torch.device) -> Iterator[DetectionBatch]:
    """Yield batches only while every rank has one, so all ranks run the same number of DDP steps.

    A step where some rank's batch is empty (all its images corrupt) is skipped by all ranks; when one rank
    runs out, the others drain their iterators without training.
    """
    iterator = iter(batches)
    for batch in iterator:
        status = torch.tensor([2 if len(batch) else 1], device=device)
        if distributed():
            dist.all_reduce(status, op=dist.ReduceOp.MIN)
        if int(status) == 2:
            yield batch
    if distributed():  # this rank is exhausted: tell the others until they are too
        while True:
            status = torch.tensor([0], device=device)
            dist.all_reduce(status, op=dist.ReduceOp.MAX)
            if int(status) == 0:
                break


def _sum_over_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if distributed():
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def train_one_epoch(
    model: torch.nn.Module,
    criterion,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[DetectionBatch],
    cfg: TrainJobConfig,
    device: torch.device,
    epoch: int,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
    rank: int,
    steps_per_epoch: int | None,
) -> dict[str, float]:
    """Train over this rank's shard once; returns metrics summed over all ranks (losses averaged).

    Besides losses and images/s: ``train_data_wait_s``, the seconds a rank waited for its next batch (mean
    over ranks; the rest of the epoch is compute, as each step ends with a host-device sync), and
    ``train_first_batch_s``, the part of it spent before the first batch (the input pipeline's start).
    """
    sums = {"loss": 0.0, "loss_class": 0.0, "loss_bbox": 0.0, "loss_giou": 0.0, "loss_align": 0.0}
    sums |= {"steps": 0.0, "images": 0.0, "corrupt": 0.0, "data_wait_s": 0.0, "first_batch_s": 0.0}
    started = time.perf_counter()
    estimate = steps_per_epoch
    iterator = synchronized_batches(batches, device)
    for step in itertools.count():
        waiting = time.perf_counter()
        batch = next(iterator, None)
        waited = time.perf_counter() - waiting
        sums["data_wait_s"] += waited
        if step == 0:
            sums["first_batch_s"] = waited
        if batch is None:
            break
        sums["corrupt"] += batch.num_corrupt
        batch = batch.to(device, non_blocking=True)
        losses = train_step(
            model, criterion, optimizer, batch.images, batch.padding_mask, batch.targets,
            cfg.optimizer.grad_clip_norm, amp_dtype, scaler,
        )  # fmt: skip
        terms = losses.final_terms()
        sums["loss"] += float(losses.total.detach())
        for name in ("class", "bbox", "giou", "align"):
            if name in terms:
                sums[f"loss_{name}"] += float(terms[name])
        sums["steps"] += 1
        sums["images"] += len(batch)
        if rank == 0 and (step + 1) % cfg.training.log_every_steps == 0:
            elapsed = time.perf_counter() - started
            rate = (step + 1) / elapsed
            eta = f"{max(estimate - step - 1, 0) / rate:.0f}s" if estimate else "?"
            print(
                f"[epoch {epoch}] step {step + 1}{f'/{estimate}' if estimate else ''} "
                f"loss {sums['loss'] / sums['steps']:.3f} {sums['images'] / elapsed:.1f} img/s (rank 0) ETA {eta}",
                flush=True,
            )
    totals = _sum_over_workers(sums, device)
    elapsed = time.perf_counter() - started
    steps = max(totals.pop("steps"), 1.0)
    metrics = {f"train_{k}": v / steps for k, v in totals.items() if k.startswith("loss")}
    metrics["train_images_per_s"] = totals["images"] / max(elapsed, 1e-9)
    metrics["train_corrupt_images"] = totals["corrupt"]
    metrics["train_epoch_seconds"] = elapsed
    world_size = dist.get_world_size() if distributed() else 1
    metrics["train_data_wait_s"] = totals["data_wait_s"] / world_size
    metrics["train_first_batch_s"] = totals["first_batch_s"] / world_size
    return metrics


@dataclass
class Evaluation:
    """One evaluation: metrics, the COCO evaluator, the first images with their predictions, and the
    decoder attention figures of the first val batch (rank 0 logs them)."""

    metrics: dict[str, float]
    evaluator: CocoEvaluator
    kept: list[tuple[torch.Tensor, dict, dict]]
    attention: list[tuple[int, Figure]]


def evaluate(
    model: Detector,
    batches: Iterable[DetectionBatch],
    ground_truth: COCO,
    label_to_category_id: torch.Tensor,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    keep_images: int = 0,
) -> Evaluation:
    """COCO evaluation and score-IoU diagnostics over all val batches on this process; attention maps of
    the first ``keep_images`` images of the first batch."""
    evaluator = CocoEvaluator(ground_truth)
    kept: list[tuple[torch.Tensor, dict, dict]] = []
    attention: list[tuple[int, Figure]] = []
    all_detections, all_targets = [], []
    corrupt = 0
    for batch in batches:
        corrupt += batch.num_corrupt
        if not len(batch):
            continue
        on_device = batch.to(device)
        orig_sizes = torch.stack([t["orig_size"] for t in on_device.targets])
        detections = predict(model, on_device.images, on_device.padding_mask, orig_sizes, label_to_category_id,
                             amp_dtype=amp_dtype)  # fmt: skip
        detections = [{k: v.cpu() for k, v in d.items()} for d in detections]
        evaluator.update([int(t["image_id"]) for t in batch.targets], detections)
        all_detections.extend(detections)
        all_targets.extend(targets_to_pixel_xyxy(batch.targets, label_to_category_id))
        if keep_images and not attention:
            count = min(keep_images, len(batch))
            figures = attention_figures(model, on_device.images[:count], on_device.padding_mask[:count])
            attention = [(int(t["image_id"]), f) for t, f in zip(batch.targets[:count], figures, strict=True)]
        for index in range(len(batch)):
            if len(kept) < keep_images:
                kept.append((batch.images[index], batch.targets[index], detections[index]))
    metrics = {f"val_{k}": v for k, v in evaluator.summarize().items()}
    alignment = score_iou_alignment(all_detections, all_targets)
    metrics |= {f"val_{k}": v for k, v in alignment.items() if k.startswith(("score_iou", "best_regressed"))}
    metrics["val_corrupt_images"] = float(corrupt)
    metrics["val_images"] = float(len(set(evaluator.image_ids)))
    return Evaluation(metrics, evaluator, kept, attention)


def load_checkpoint_state(directory: str | Path) -> dict[str, Any]:
    """The training state saved in a checkpoint directory (``torch.load(weights_only=True)``)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def _maybe_inject_fault(cfg: TrainJobConfig, epoch: int, rank: int) -> None:
    injection = cfg.training.fault_injection
    if injection.kill_after_epoch != epoch or injection.rank != rank:
        return
    marker = Path(cfg.training.storage_path) / cfg.training.run_name / f"fault_injected_after_epoch_{epoch}"
    if marker.exists():
        return
    if epoch > 0:
        _wait_until_checkpoint_registered(marker.parent / CHECKPOINT_MANAGER_SNAPSHOT_FILENAME, epoch - 1)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed once by training.fault_injection\n")
    print(f"[fault injection] killing rank {rank} after epoch {epoch}", flush=True)
    os._exit(1)


def _wait_until_checkpoint_registered(snapshot: Path, epoch: int, timeout_s: float = 120.0) -> None:
    """Block until Ray Train's controller has registered the checkpoint reported for ``epoch``.

    Ray Train V2 queues a report in the worker until the controller polls it (every ~2 s); a worker that
    dies before that poll loses the report, and the restart resumes from the checkpoint before. The fault
    hook waits for the controller's checkpoint snapshot (``checkpoint_manager_snapshot.json`` in the run's
    storage) to list that epoch, so "killed after epoch k" always resumes from epoch k-1's checkpoint.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
        except (OSError, ValueError):
            results = []
        if any(r.get("metrics", {}).get("epoch") == float(epoch) for r in results):
            return
        time.sleep(0.2)


def quiet_report_logs() -> None:
    """Silence Ray Train's INFO line per ``ray.train.report`` call and rank (every metric, three long lines
    per epoch); the rank-0 epoch line says the same in one line. Ray 2.60 names that logger by its file
    path, outside ``ray.train``, so ``RunConfig(logging_config=...)`` does not reach it."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """Entry point of every Ray Train worker. ``loop_config`` holds the validated job config (JSON), the
    MLflow tracking URI and run id (rank 0 logs there)."""
    quiet_report_logs()
    cfg = TrainJobConfig.model_validate(loop_config["config"])
    run_id: str | None = loop_config.get("mlflow_run_id")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = None
    if device.type == "cuda" and cfg.scaling.amp != "none":
        amp_dtype = torch.bfloat16 if cfg.scaling.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    torch.manual_seed(cfg.training.seed)
    detector = build_detector(cfg.model, seed=cfg.training.seed)
    model = ray.train.torch.prepare_model(detector, parallel_strategy_kwargs={"find_unused_parameters": False})
    criterion = build_criterion(cfg, mean_over_workers)
    optimizer = build_optimizer(unwrap(model), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer)

    client = client_for(loop_config["tracking_uri"]) if (rank == 0 and run_id) else None
    start_epoch, best_ap, best_epoch = 0, float("-inf"), -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint_state(directory)
        unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = int(state["epoch"]) + 1
        best_ap, best_epoch = float(state["best_ap"]), int(state["best_epoch"])
        if rank == 0:
            print(f"[resume] from checkpoint of epoch {state['epoch']}: continuing at epoch {start_epoch}", flush=True)
            if client is not None:
                log_metrics(client, run_id, {"resumed_from_epoch": float(state["epoch"])}, step=start_epoch)

    val_meta = load_meta(cfg.data.val_dir)
    label_to_category_id = torch.as_tensor(val_meta.category_ids, dtype=torch.int64)
    ground_truth = None
    if rank == 0:
        ground_truth = coco_from_dict(json.loads(val_meta.annotation_path(cfg.data.val_dir).read_text()))
    train_shard = ray.train.get_dataset_shard("train")
    val_data = ray.train.get_dataset_shard("val")

    train_images = load_meta(cfg.data.train_dir).counts.images
    steps_per_epoch = -(-train_images // (cfg.data.loader.batch_size * world))
    for epoch in range(start_epoch, cfg.optimizer.epochs):
        batches = iter_detection_batches(train_shard, cfg.data.loader, cfg.data.augmentation)
        metrics = train_one_epoch(
            model, criterion, optimizer, batches, cfg, device, epoch, amp_dtype, scaler, rank, steps_per_epoch
        )
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        _maybe_inject_fault(cfg, epoch, rank)

        payload: list[Any] = [None]
        checkpoint_dir = tempfile.mkdtemp(prefix="sd-detr-ckpt-") if rank == 0 else None
        if rank == 0:
            val_batches = iter_detection_batches(val_data, cfg.data.loader, cfg.data.augmentation)
            evaluation = evaluate(
                unwrap(model), val_batches, ground_truth, label_to_category_id, device, amp_dtype,
                cfg.training.num_prediction_images,
            )  # fmt: skip
            metrics |= evaluation.metrics
            if metrics["val_AP"] > best_ap:
                best_ap, best_epoch = metrics["val_AP"], epoch
            metrics |= {"epoch": float(epoch), "best_val_AP": best_ap, "best_epoch": float(best_epoch)}
            print(
                f"[epoch {epoch}] loss {metrics['train_loss']:.3f} val AP {metrics['val_AP']:.4f} "
                f"AP50 {metrics['val_AP50']:.4f} ({metrics['train_images_per_s']:.1f} img/s, "
                f"{metrics['train_epoch_seconds']:.0f}s, waiting for data {metrics['train_data_wait_s']:.0f}s)",
                flush=True,
            )
            if client is not None:
                log_metrics(client, run_id, metrics, step=epoch)
                log_evaluation_artifacts(client, run_id, epoch, evaluation, cfg)
            state = {
                "model": unwrap(model).state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "epoch": epoch,
                "best_ap": best_ap,
                "best_epoch": best_epoch,
                "config": json.dumps(cfg.model_dump(mode="json")),
            }
            torch.save(state, Path(checkpoint_dir) / CHECKPOINT_FILE)
            payload = [metrics]
        if distributed():
            dist.broadcast_object_list(payload, src=0)
        report_checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if rank == 0 else None
        ray.train.report(payload[0], checkpoint=report_checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return {"best_val_AP": best_ap, "best_epoch": float(best_epoch)}
