"""Driver side of a training run, shared by `pipelines/train.py` and the Tune sweep: prepare data and
tracking, build and fit the TorchTrainer, register the best model."""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import yaml
from ray.train.torch import TorchTrainer

from pipelines.checkpoint import load_checkpoint_state
from pipelines.config import REPO_ROOT, TrainJobConfig
from pipelines.fault_injection import PROGRESS_DIR_ENV
from pipelines.metrics_outbox import RunStorage, TrackingOutbox, bound_http_retries
from pipelines.model_artifact import write_checkpoint_model_files
from pipelines.ray_data import build_data_config, build_datasets
from pipelines.run_guard import check_resume_compatible, job_lock
from pipelines.tags import BACKBONE_INIT_TAG, GIT_COMMIT_TAG
from pipelines.tracking import (
    check_reachable,
    client_for,
    get_or_create_experiment,
    git_commit,
    log_dataset_inputs,
    log_text_artifact,
    register_model,
    run_url,
    start_or_resume_run,
)
from pipelines.worker import train_loop_per_worker
from sd_detr.backbone_weights import (
    backbone_init_tag,
    check_backbone_weights,
    random_backbone_warning,
    require_backbone_init,
)
from sd_detr.config import flatten_config
from sd_detr.data.builtin import ensure_synthetic_dataset
from sd_detr.data.meta import load_ground_truth, load_meta
from sd_detr.names import BEST_VAL_AP, VAL_AP

logger = logging.getLogger(__name__)

"""Run tag: the backbone weights file, or that the backbone started from random weights."""
TRACKING_FILE = "tracking.json"
"""In the run's storage folder: the MLflow tracking URI, experiment and run id (for `pipelines/register.py`)."""
FINAL_FLUSH_DELAYS_S = (2.0, 5.0, 10.0, 15.0, 30.0)
"""Pauses between the driver's attempts to send what the workers could not log, at the end of a job (about a
minute in all before the job gives up and exits non-zero)."""


class ClusterTooSmallError(RuntimeError):
    """The cluster cannot host the requested workers (Ray would wait forever)."""


class TrackingIncompleteError(RuntimeError):
    """Training finished and its checkpoints are saved, but MLflow could not be reached to log everything or
    to register the model; the message says what is missing and the command that completes it later."""

    def __init__(self, message: str, outcome: TrainingOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class PreparedRun:
    """A validated config with absolute paths and its MLflow run."""

    config: TrainJobConfig
    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool


@dataclass
class TrainingOutcome:
    """What a finished run left behind."""

    run_id: str
    best_val_ap: float
    best_epoch: int
    checkpoint_path: str | None
    registered_version: str | None
    aliased: bool
    metrics: dict


def resolve_data(cfg: TrainJobConfig) -> TrainJobConfig:
    """Generate the synthetic dataset when no shards are configured; check that the val shards carry their
    cleaned ground truth (evaluation reads only that); set ``model.num_classes`` from the dataset (an
    explicit, different value is an error).

    Raises:
        FileNotFoundError: a shard directory is incomplete, or the val directory predates the ground-truth
            file (``GroundTruthNotFoundError``, whose message holds the re-convert command).
        ValueError: train and val categories differ, or ``model.num_classes`` contradicts the dataset.
    """
    if cfg.data.train_dir is None:
        root = ensure_synthetic_dataset(cfg.data.synthetic_root, cfg.data.synthetic, progress=True)
        cfg = cfg.model_copy(
            update={"data": cfg.data.model_copy(update={"train_dir": root / "train", "val_dir": root / "val"})}
        )
    train_meta, val_meta = load_meta(cfg.data.train_dir), load_meta(cfg.data.val_dir)
    load_ground_truth(cfg.data.val_dir)  # here, not at the first evaluation after an epoch of training
    if train_meta.category_ids.tolist() != val_meta.category_ids.tolist():
        raise ValueError(f"train and val shards have different categories: {cfg.data.train_dir}, {cfg.data.val_dir}")
    if "num_classes" in cfg.model.model_fields_set and cfg.model.num_classes != train_meta.num_classes:
        raise ValueError(
            f"model.num_classes={cfg.model.num_classes} but the dataset has {train_meta.num_classes} categories"
        )
    model = cfg.model.model_copy(update={"num_classes": train_meta.num_classes})
    return cfg.model_copy(update={"model": model})


def check_backbone_init(cfg: TrainJobConfig) -> None:
    """Driver-side check of the backbone's initial weights, before any cluster or tracking work: a weights
    file is given and fits the configured ResNet, or ``model.backbone.pretrained=false`` says the backbone is
    random on purpose (then a warning is logged).

    Raises:
        ValueError: no weights file and no opt-out; the file does not fit (naming the path and keys).
        FileNotFoundError: the weights file does not exist (on the driver; workers need the same path).
    """
    backbone = cfg.model.backbone
    require_backbone_init(backbone)
    check_backbone_weights(backbone)
    warning = random_backbone_warning(backbone)
    if warning is not None:
        logger.warning(warning)


def prepare_run(cfg: TrainJobConfig, run_name: str | None = None, parent_run_id: str | None = None) -> PreparedRun:
    """Absolute paths, data on disk, reachable tracking store, experiment and (new or resumed) run."""
    cfg = cfg.with_absolute_paths()
    if run_name is not None:
        cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"run_name": run_name})})
    uri = cfg.tracking.tracking_uri
    check_reachable(uri)
    cfg = resolve_data(cfg)
    check_resume_compatible(cfg)
    client = client_for(uri)
    experiment_id = get_or_create_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_root, uri)
    run_id, resumed = start_or_resume_run(
        client, experiment_id, cfg.training.run_name, flatten_config(cfg), parent_run_id
    )
    client.set_tag(run_id, BACKBONE_INIT_TAG, backbone_init_tag(cfg.model.backbone))
    commit = git_commit(REPO_ROOT)
    if commit is not None:
        client.set_tag(run_id, GIT_COMMIT_TAG, commit)
    if not resumed:
        log_text_artifact(client, run_id, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), "config.yaml")
        log_dataset_inputs(client, run_id, cfg.data.train_dir, cfg.data.val_dir)
    record = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
    RunStorage(cfg.training.storage_path, cfg.training.run_name).write_text(TRACKING_FILE, json.dumps(record))
    return PreparedRun(cfg, uri, experiment_id, run_id, resumed)


def ensure_ray() -> None:
    """Join ``$RAY_ADDRESS`` or start a local Ray (once per process), telling the job's actors where the
    cluster is: ``RAY_ADDRESS`` when joining, the local dashboard URL otherwise.

    Ray Train's placement-group cleaner looks the cluster up by itself; on a host where a ``ray start`` left
    its address file behind it would ask that (dead) cluster, time out and give up, leaving a stopped run's
    workers reserved. ``address="local"`` likewise never attaches to such a stale cluster.
    """
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": {"RAY_ADDRESS": address}})
        return
    with socket.socket() as probe:  # a free port for the dashboard, so its URL is known before it starts
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(
        address="local",
        dashboard_port=port,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


def check_cluster_fits(cfg: TrainJobConfig) -> None:
    """Fail fast instead of hanging when workers (plus a CPU for Ray Data) do not fit the cluster."""
    resources = ray.cluster_resources()
    cpus_needed = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.loader.decode_num_cpus
    if resources.get("CPU", 0.0) < cpus_needed:
        raise ClusterTooSmallError(
            f"the Ray cluster has {resources.get('CPU', 0.0):g} CPUs, the job needs {cpus_needed:g} "
            f"({cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker:g} + "
            f"{cfg.data.loader.decode_num_cpus:g} for data loading)"
        )
    if cfg.scaling.use_gpu and resources.get("GPU", 0.0) < cfg.scaling.num_workers:
        raise ClusterTooSmallError(
            f"scaling.use_gpu with {cfg.scaling.num_workers} workers needs that many GPUs; "
            f"the cluster has {resources.get('GPU', 0.0):g}"
        )


def build_trainer(prepared: PreparedRun, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of a prepared run (same code for train.py and each Tune trial)."""
    cfg = prepared.config
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


def select_best_checkpoint(result: ray.train.Result) -> tuple[ray.train.Checkpoint | None, dict]:
    """The kept checkpoint with the highest val AP and its metrics, or ``(None, {})`` when none has one."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m and VAL_AP in m]
    return max(scored, key=lambda item: item[1][VAL_AP]) if scored else (None, {})


def register_checkpoint(prepared: PreparedRun, checkpoint: ray.train.Checkpoint, val_ap: float) -> tuple[str, bool]:
    """Log the model of ``checkpoint`` to the prepared run, register it under ``tracking.model_name`` and move
    ``tracking.alias`` when ``val_ap`` beats the aliased version's. Returns (version, aliased)."""
    with checkpoint.as_directory() as directory:
        return register_checkpoint_dir(prepared, directory, val_ap)


def register_checkpoint_dir(prepared: PreparedRun, directory: str | Path, val_ap: float) -> tuple[str, bool]:
    """:func:`register_checkpoint` for a checkpoint folder on this machine."""
    cfg = prepared.config
    state = load_checkpoint_state(directory)
    # The registered model is a pyfunc model of safetensors + JSON files (pipelines/serving.py), no pickle.
    with tempfile.TemporaryDirectory(prefix="sd-detr-model-") as model_dir:
        paths, example = write_checkpoint_model_files(
            model_dir, state["model"], cfg, cfg.data.val_dir, cfg.data.augmentation
        )
        return register_model(
            prepared.tracking_uri, prepared.run_id, paths, example, cfg.tracking.model_name, cfg.tracking.alias,
            val_ap, {"epoch": int(state["epoch"]), VAL_AP: float(val_ap)},
        )  # fmt: skip


def finish_run(prepared: PreparedRun, result: ray.train.Result) -> TrainingOutcome:
    """Close the MLflow run of a fitted trainer: send what the workers could not log, register the best
    checkpoint's model and move the alias.

    Raises:
        RuntimeError: training itself failed (the run is marked FAILED when MLflow answers).
        TrackingIncompleteError: training finished but MLflow stayed unreachable (after about a minute of
            retries, :data:`FINAL_FLUSH_DELAYS_S`): the unsent metrics stay in the run's storage folder and
            the message holds the `pipelines/register.py` command that logs them and registers the model.
    """
    cfg, client = prepared.config, client_for(prepared.tracking_uri)
    bound_http_retries()
    outbox = TrackingOutbox.open(client, prepared.run_id, RunStorage(cfg.training.storage_path, cfg.training.run_name))
    if result.error is not None:
        try:
            outbox.flush(FINAL_FLUSH_DELAYS_S[:2])
            client.set_terminated(prepared.run_id, status="FAILED")
        except Exception as error:  # the training error is the one to report
            logger.warning("could not mark MLflow run %s FAILED: %s", prepared.run_id, error)
        raise RuntimeError(f"training run {cfg.training.run_name!r} failed: {result.error}") from result.error
    best_checkpoint, best_metrics = select_best_checkpoint(result)
    returned = result.return_value or {}
    outcome = TrainingOutcome(
        run_id=prepared.run_id,
        best_val_ap=float(best_metrics.get(VAL_AP, returned.get(BEST_VAL_AP, float("nan")))),
        best_epoch=int(best_metrics.get("epoch", returned.get("best_epoch", -1))),
        checkpoint_path=best_checkpoint.path if best_checkpoint is not None else None,
        registered_version=None,
        aliased=False,
        metrics=dict(result.metrics or {}),
    )
    register = best_checkpoint is not None and cfg.tracking.register_model
    try:
        if not outbox.flush(FINAL_FLUSH_DELAYS_S):
            raise ConnectionError(outbox.last_error)
        if register:
            outcome.registered_version, outcome.aliased = register_checkpoint(
                prepared, best_checkpoint, float(best_metrics[VAL_AP])
            )
        client.set_terminated(prepared.run_id, status="FINISHED")
    except Exception as error:
        missing = [outbox.describe()] if outbox.pending or outbox.unsent_artifacts() else []
        if register and outcome.registered_version is None:
            missing.append(f"the model of {outcome.checkpoint_path} (not registered)")
        command = f"python pipelines/register.py --checkpoint {outcome.checkpoint_path}"
        if not register:
            command += " --no-register"
        raise TrackingIncompleteError(
            f"training run {cfg.training.run_name!r} finished (checkpoints in {cfg.training.storage_path}/"
            f"{cfg.training.run_name}) but MLflow at {prepared.tracking_uri} could not be reached to finish it "
            f"({type(error).__name__}: {str(error)[:200]}).\n  not logged: {'; '.join(missing) or 'run status'}\n"
            f"  kept in: {outbox.storage.uri}\n  when MLflow is back, run: {command}",
            outcome,
        ) from error
    return outcome


def run_training(cfg: TrainJobConfig, callbacks: list | None = None) -> TrainingOutcome:
    """Validate, prepare, fit and register: the whole `pipelines/train.py` job."""
    check_backbone_init(cfg)
    with job_lock(cfg.with_absolute_paths()):
        prepared = prepare_run(cfg)
        print(f"MLflow run {prepared.run_id}{' (resumed)' if prepared.resumed else ''}: "
              f"{run_url(prepared.tracking_uri, prepared.experiment_id, prepared.run_id)}", flush=True)  # fmt: skip
        ensure_ray()
        check_cluster_fits(prepared.config)
        result = build_trainer(prepared, callbacks).fit()
        return finish_run(prepared, result)


def print_summary(outcome: TrainingOutcome, cfg: TrainJobConfig) -> None:
    """The end-of-job summary: best AP, checkpoint, registered version."""
    print("== sd-detr training finished")
    print(f"   best val AP   : {outcome.best_val_ap:.4f} (epoch {outcome.best_epoch})")
    print(f"   checkpoint    : {outcome.checkpoint_path}")
    if outcome.registered_version is not None:
        alias = f", alias @{cfg.tracking.alias} moved" if outcome.aliased else f", @{cfg.tracking.alias} kept"
        print(f"   registered    : models:/{cfg.tracking.model_name}/{outcome.registered_version}{alias}")
    print(f"   MLflow run id : {outcome.run_id}", flush=True)
