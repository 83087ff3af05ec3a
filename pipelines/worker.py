"""The Ray Train worker loop: DDP training epochs, each followed by a distributed evaluation, rank 0's
checkpoint and then rank 0's MLflow logging (through a durable outbox, `pipelines.metrics_outbox`, so a tracking
outage never costs training). Evaluation, checkpoints, fault injection and the DDP helpers live in
`pipelines.distributed_eval`, `pipelines.checkpoint`, `pipelines.fault_injection` and `pipelines.ddp`."""

from __future__ import annotations

import itertools
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipelines.checkpoint import load_checkpoint_state, restore_training_state, save_checkpoint_state, training_state
from pipelines.config import TrainJobConfig
from pipelines.ddp import (
    build_worker_detector,
    distributed,
    mean_over_workers,
    seed_worker,
    sum_over_workers,
    synchronized_batches,
)
from pipelines.distributed_eval import evaluate, ground_truth_coco
from pipelines.early_start import EarlyStart
from pipelines.fault_injection import ProgressRecorder, maybe_inject_fault
from pipelines.metrics_outbox import (
    FolderArtifactClient,
    RunStorage,
    TrackingOutbox,
    bound_http_retries,
    registered_checkpoint_epoch,
)
from pipelines.reporting import log_evaluation_artifacts
from pipelines.row_selection import val_share_name
from pipelines.torch_batches import iter_detection_batches
from pipelines.tracking import client_for
from sd_detr.data.collate import DetectionBatch
from sd_detr.data.meta import load_meta
from sd_detr.engine import (
    LossMeter,
    build_criterion,
    build_lr_scheduler,
    build_optimizer,
    train_step,
)
from sd_detr.model import Detector
from sd_detr.names import (
    BEST_VAL_AP,
    LOSS,
    TRAIN_CORRUPT_IMAGES,
    TRAIN_DATA_WAIT_S,
    TRAIN_EPOCH_SECONDS,
    TRAIN_FIRST_BATCH_S,
    TRAIN_IMAGES_PER_S,
    TRAIN_LOSS,
    VAL_AP,
    VAL_AP50,
    VAL_SECONDS,
    loss_metric,
    train_metric,
)  # fmt: skip

logger = logging.getLogger(__name__)


def unwrap(model: torch.nn.Module) -> Detector:
    """The detector inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


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
    progress: ProgressRecorder | None = None,
) -> dict[str, float]:
    """Train over this rank's shard once; returns metrics summed over all ranks (losses averaged).

    Besides losses and images/s: ``train_data_wait_s``, the seconds a rank waited for its next batch (mean
    over ranks; the rest of the epoch is compute, as each step waits for the device at its matching), and
    ``train_first_batch_s``, the part of it spent before the first batch (the input pipeline's start).
    ``progress`` (a test hook) is told about every finished step.

    The losses are summed on the device (:class:`sd_detr.engine.LossMeter`) and read every
    ``training.log_every_steps`` steps and at the end, on every rank: the only host-device wait of a step is its
    matching, and a non-finite loss raises ``FloatingPointError`` at the next read (within that many steps).
    """
    meter = LossMeter(device)
    sums = {"steps": 0.0, "images": 0.0, "corrupt": 0.0, "data_wait_s": 0.0, "first_batch_s": 0.0}
    started = time.perf_counter()
    estimate = steps_per_epoch

    def count_skipped(batch: DetectionBatch) -> None:  # a batch some rank could not train on
        sums["corrupt"] += batch.num_corrupt

    iterator = synchronized_batches(batches, on_skip=count_skipped)
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
            cfg.optimizer.grad_clip_norm, amp_dtype, scaler, batch.image_sizes,
        )  # fmt: skip
        meter.add(losses)
        sums["steps"] += 1
        sums["images"] += len(batch)
        if progress is not None:
            progress.step_done(epoch, step + 1)
        if (step + 1) % cfg.training.log_every_steps == 0:
            running = meter.read()  # on every rank: raises on a non-finite loss
            if rank == 0:
                elapsed = time.perf_counter() - started
                rate = (step + 1) / elapsed
                eta = f"{max(estimate - step - 1, 0) / rate:.0f}s" if estimate else "?"
                logger.info(
                    "[epoch %d] step %d%s loss %.3f %.1f img/s (rank 0) ETA %s",
                    epoch, step + 1, f"/{estimate}" if estimate else "", running[loss_metric()] / sums["steps"],
                    sums["images"] / elapsed, eta,
                )  # fmt: skip
    totals = sum_over_workers(sums | meter.read(), device)
    elapsed = time.perf_counter() - started
    steps = max(totals.pop("steps"), 1.0)
    metrics = {train_metric(k): v / steps for k, v in totals.items() if k.startswith(LOSS)}
    metrics[TRAIN_IMAGES_PER_S] = totals["images"] / max(elapsed, 1e-9)
    metrics[TRAIN_CORRUPT_IMAGES] = totals["corrupt"]
    metrics[TRAIN_EPOCH_SECONDS] = elapsed
    world_size = dist.get_world_size() if distributed() else 1
    metrics[TRAIN_DATA_WAIT_S] = totals["data_wait_s"] / world_size
    metrics[TRAIN_FIRST_BATCH_S] = totals["first_batch_s"] / world_size
    return metrics


def quiet_report_logs() -> None:
    """Silence Ray Train's INFO line per ``ray.train.report`` call and rank (every metric, three long lines
    per epoch); the rank-0 epoch line says the same in one line. Ray 2.60 names that logger by its file
    path, outside ``ray.train``, so ``RunConfig(logging_config=...)`` does not reach it."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def log_progress_to_stdout(rank: int) -> None:
    """Send the ``pipelines`` loggers to this worker's stdout, which Ray forwards to the driver and the job
    log: INFO (progress lines) on rank 0, warnings only on the other ranks. Idempotent."""
    package = logging.getLogger("pipelines")
    if not any(getattr(h, "stream", None) is sys.stdout for h in package.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    package.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    package.propagate = False


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, float]:
    """Entry point of every Ray Train worker. ``loop_config`` holds the validated job config (JSON), the
    MLflow tracking URI and run id (rank 0 logs there).

    Seeds: the model is initialised from ``training.seed`` on every rank (DDP also broadcasts rank 0's
    weights); each epoch then re-seeds torch per rank and epoch (:func:`pipelines.ddp.seed_worker`), so
    dropout differs between ranks and a resumed epoch draws what an uninterrupted run would.
    """
    quiet_report_logs()
    cfg = TrainJobConfig.model_validate(loop_config["config"])
    run_id: str | None = loop_config.get("mlflow_run_id")
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    log_progress_to_stdout(rank)
    device = ray.train.torch.get_device()
    amp_dtype = None
    if device.type == "cuda" and cfg.scaling.amp != "none":
        amp_dtype = torch.bfloat16 if cfg.scaling.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    detector = build_worker_detector(cfg.model, cfg.training.seed, rank, compile=cfg.training.compile)
    model = ray.train.torch.prepare_model(detector, parallel_strategy_kwargs={"find_unused_parameters": False})
    criterion = build_criterion(cfg, mean_over_workers)
    optimizer = build_optimizer(unwrap(model), cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.optimizer)

    outbox = None
    if rank == 0:
        bound_http_retries()
        client = client_for(loop_config["tracking_uri"]) if run_id else None
        outbox = TrackingOutbox.open(client, run_id, RunStorage(cfg.training.storage_path, cfg.training.run_name))
    progress = ProgressRecorder.from_environment(rank)
    start_epoch, best_ap, best_epoch = 0, float("-inf"), -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint_state(directory)
        resume = restore_training_state(state, unwrap(model), optimizer, scheduler, scaler)
        start_epoch, best_ap, best_epoch = resume.start_epoch, resume.best_ap, resume.best_epoch
        if rank == 0:
            logger.info("[resume] from checkpoint of epoch %d: continuing at epoch %d", start_epoch - 1, start_epoch)
    if outbox is not None:
        outbox.drop_epochs_from(start_epoch)  # recorded by a worker group that died before checkpointing them
        if checkpoint is not None:
            outbox.add_metrics({"resumed_from_epoch": float(start_epoch - 1)}, step=start_epoch)
        outbox.flush()

    label_to_category_id = torch.as_tensor(load_meta(cfg.data.val_dir).category_ids, dtype=torch.int64)
    ground_truth = ground_truth_coco(cfg.data.val_dir) if rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    val_share = ray.train.get_dataset_shard(val_share_name(rank))

    train_images = load_meta(cfg.data.train_dir).counts.images
    steps_per_epoch = -(-train_images // (cfg.data.loader.batch_size * world))
    next_epoch_batches: Iterable[DetectionBatch] | None = None
    for epoch in range(start_epoch, cfg.optimizer.epochs):
        seed_worker(cfg.training.seed, rank, epoch)
        batches = next_epoch_batches or iter_detection_batches(
            train_shard, cfg.data.loader, cfg.data.augmentation, train=True
        )
        metrics = train_one_epoch(
            model, criterion, optimizer, batches, cfg, device, epoch, amp_dtype, scaler, rank, steps_per_epoch,
            progress,
        )  # fmt: skip
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        maybe_inject_fault(cfg, epoch, rank)

        if epoch + 1 < cfg.optimizer.epochs:  # Ray Data starts the next epoch while this one is evaluated
            train_batches = iter_detection_batches(train_shard, cfg.data.loader, cfg.data.augmentation, train=True)
            next_epoch_batches = EarlyStart(train_batches, name=f"epoch{epoch + 1}-first-batch")
        val_batches = iter_detection_batches(val_share, cfg.data.loader, cfg.data.augmentation)
        evaluation = evaluate(
            unwrap(model), val_batches, ground_truth, label_to_category_id, device, amp_dtype,
            cfg.training.num_prediction_images, (cfg.data.augmentation.mean, cfg.data.augmentation.std),
        )  # fmt: skip
        payload: list[Any] = [None]
        checkpoint_dir = None
        if evaluation is not None:  # rank 0
            metrics |= evaluation.metrics
            if metrics[VAL_AP] > best_ap:
                best_ap, best_epoch = metrics[VAL_AP], epoch
            metrics |= {"epoch": float(epoch), BEST_VAL_AP: best_ap, "best_epoch": float(best_epoch)}
            logger.info(
                "[epoch %d] loss %.3f val AP %.4f AP50 %.4f (%.1f img/s, %.0fs, waiting for data %.0fs, eval %.0fs)",
                epoch, metrics[TRAIN_LOSS], metrics[VAL_AP], metrics[VAL_AP50], metrics[TRAIN_IMAGES_PER_S],
                metrics[TRAIN_EPOCH_SECONDS], metrics[TRAIN_DATA_WAIT_S], metrics[VAL_SECONDS],
            )  # fmt: skip
            checkpoint_dir = tempfile.mkdtemp(prefix="sd-detr-ckpt-")
            state = training_state(unwrap(model), optimizer, scheduler, scaler, epoch, best_ap, best_epoch, cfg)
            save_checkpoint_state(checkpoint_dir, state, metrics)
            # Recorded durably now, sent after the checkpoint is reported (below): MLflow being down costs
            # nothing but a later upload.
            if outbox.enabled:
                with tempfile.TemporaryDirectory(prefix="sd-detr-artifacts-") as staging:
                    log_evaluation_artifacts(FolderArtifactClient(staging), run_id, epoch, evaluation, cfg)
                    outbox.add_artifacts(staging, f"epoch{epoch:03d}")
                outbox.add_metrics(metrics, step=epoch, epoch=epoch)
            payload = [metrics]
        if distributed():
            dist.broadcast_object_list(payload, src=0)
        report_checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(payload[0], checkpoint=report_checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if outbox is not None:  # epochs whose checkpoint the controller has registered (usually the previous)
            outbox.flush(durable_through=registered_checkpoint_epoch(outbox.storage))
    if outbox is not None:  # the driver sends the rest after fit(), when every checkpoint is registered
        outbox.flush(durable_through=registered_checkpoint_epoch(outbox.storage))
    return {BEST_VAL_AP: best_ap, "best_epoch": float(best_epoch)}
