"""The Ray Train TorchTrainer of a prepared run (same code for `pipelines/train.py` and each Tune trial)."""

from __future__ import annotations

import os

import ray
import ray.train
from ray.train.torch import TorchTrainer

from pipelines.fault_injection import PROGRESS_DIR_ENV
from pipelines.ray_console import apply_ray_console
from pipelines.ray_data import build_data_config, build_datasets
from pipelines.run_setup import PreparedRun
from pipelines.worker import train_loop_per_worker
from sd_detr.names import VAL_AP


def build_trainer(prepared: PreparedRun, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of a prepared run: its workers, datasets, checkpoint policy and storage. Sets this
    process's console for Ray's lines first (``training.ray_console``)."""
    cfg = prepared.config
    apply_ray_console(cfg.training.ray_console)
    resources = {"CPU": cfg.scaling.cpus_per_worker}
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False
    data_context.print_on_execution_start = False
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tracking_uri": prepared.tracking_uri,
            "mlflow_run_id": prepared.run_id,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.training.run_name,
            storage_path=str(cfg.training.storage_path),
            failure_config=ray.train.FailureConfig(max_failures=cfg.training.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.training.checkpoints_to_keep,
                checkpoint_score_attribute=VAL_AP,
                checkpoint_score_order="max",
            ),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": worker_env(prepared)},
        ),
        datasets=build_datasets(
            cfg.data.train_dir, cfg.data.val_dir, cfg.data.augmentation, cfg.data.loader, cfg.scaling.num_workers
        ),
        dataset_config=build_data_config(cfg.data.loader),
    )


def worker_env(prepared: PreparedRun) -> dict[str, str]:
    """Environment of the Train workers: the tracking URI, MLflow's HTTP client bounded to one quick attempt
    per call (the workers' outbox retries and buffers instead; the user's own values win), and the
    progress-file test hook when the driver has it set."""
    env = {
        "MLFLOW_TRACKING_URI": prepared.tracking_uri,
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # workers print progress once (the patch would log it twice)
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
        "MLFLOW_HTTP_REQUEST_TIMEOUT": os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT", "10"),
    }
    if os.environ.get(PROGRESS_DIR_ENV):
        env[PROGRESS_DIR_ENV] = os.environ[PROGRESS_DIR_ENV]
    return env
