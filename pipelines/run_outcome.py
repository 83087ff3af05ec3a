"""The end of a training run on the driver: send what the workers could not log, register the best
checkpoint's model, close the MLflow run and log the job's summary."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import ray.train
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer

from pipelines.checkpoint import load_checkpoint_state
from pipelines.config import TrainJobConfig
from pipelines.metrics_outbox import RunStorage, TrackingOutbox, bound_http_retries, registered_checkpoint_epoch
from pipelines.model_artifact import write_checkpoint_model_files
from pipelines.run_setup import PreparedRun
from pipelines.tags import REGISTERED_CHECKPOINT_TAG, REGISTERED_VERSION_TAG
from pipelines.tracking import AliasNotMovedError, client_for, move_alias, register_model
from sd_detr.names import BEST_VAL_AP, VAL_AP

logger = logging.getLogger(__name__)

FINAL_FLUSH_DELAYS_S = (2.0, 5.0, 10.0, 15.0, 30.0)
"""Pauses between the driver's attempts to send what the workers could not log, at the end of a job (about a
minute in all before the job gives up and exits non-zero)."""


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
    registered_before: bool = False
    """True when ``registered_version`` was registered from the same checkpoint by an earlier job of the run."""


class TrackingIncompleteError(RuntimeError):
    """Training finished and its checkpoints are saved, but MLflow could not be reached to log everything or
    to register the model; the message says what is missing and the command that completes it later."""

    def __init__(self, message: str, outcome: TrainingOutcome) -> None:
        super().__init__(message)
        self.outcome = outcome


class TrainingFailed(RuntimeError):
    """Training itself failed: a worker error past ``training.max_failures`` restarts, or Ray Train's
    controller. The message is a short summary (run, the error of each failed rank, where the checkpoints
    are, how to resume); the workers' tracebacks are in the job's log above it."""


def error_summary(error: BaseException, max_chars: int = 300) -> str:
    """The last non-empty line of ``error``'s text (a worker error's text ends with the original
    ``Type: message`` line after Ray's traceback), cut to ``max_chars``; the type's name when it has none."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    if ":" not in text:
        text = f"{type(error).__name__}: {text}"
    return text[:max_chars]


def failure_message(cfg: TrainJobConfig, run_id: str, error: BaseException) -> str:
    """The one message a failed training job ends with (see :class:`TrainingFailed`)."""
    failures = getattr(error, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        causes = [f"rank {rank}: {error_summary(failure)}" for rank, failure in sorted(failures.items())]
    else:
        cause = getattr(error, "controller_failure", None) or error
        causes = [error_summary(cause)]
    return "\n".join(
        [
            f"training run {cfg.training.run_name!r} failed (after training.max_failures="
            f"{cfg.training.max_failures} restart(s) of the worker group):",
            *(f"  {cause}" for cause in causes),
            f"  checkpoints kept in: {cfg.training.storage_path}/{cfg.training.run_name}; MLflow run {run_id} is "
            "marked FAILED",
            "  the workers' tracebacks are in the log above; once fixed, rerun the same command: it resumes from "
            "the last checkpoint",
        ]
    )


def open_outbox(prepared: PreparedRun) -> tuple[MlflowClient, TrackingOutbox]:
    """The driver's MLflow client (HTTP retries bounded) and the run's outbox of what the workers could not log."""
    cfg = prepared.config
    client = client_for(prepared.tracking_uri)
    bound_http_retries()
    storage = RunStorage(cfg.training.storage_path, cfg.training.run_name)
    return client, TrackingOutbox.open(client, prepared.run_id, storage)


def fail_run(prepared: PreparedRun, error: BaseException) -> NoReturn:
    """Send what the outbox holds (briefly), mark the MLflow run FAILED and raise :class:`TrainingFailed`."""
    try:
        client, outbox = open_outbox(prepared)
        outbox.flush(FINAL_FLUSH_DELAYS_S[:2])
        client.set_terminated(prepared.run_id, status="FAILED")
    except Exception as tracking_error:  # the training error is the one to report
        logger.warning("could not mark MLflow run %s FAILED: %s", prepared.run_id, tracking_error)
    raise TrainingFailed(failure_message(prepared.config, prepared.run_id, error)) from error


def trained_result(cfg: TrainJobConfig) -> ray.train.Result | None:
    """The run's Ray Train result read from its storage folder when the controller registered the checkpoint of
    every one of ``cfg.optimizer.epochs`` epochs (a rerun of a finished job: nothing to train, so no worker
    group to start), else None. Reads files only; needs no Ray cluster."""
    storage = RunStorage(cfg.training.storage_path, cfg.training.run_name)
    if registered_checkpoint_epoch(storage) + 1 < cfg.optimizer.epochs:
        return None
    # Ray Train's checkpoint manager logs at INFO that the snapshot "will be loaded" for the training function:
    # not what happens here
    manager_logger = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = manager_logger.level
    manager_logger.setLevel(logging.WARNING)
    try:
        return ray.train.Result.from_path(storage.uri)
    finally:
        manager_logger.setLevel(level)


def fit_or_fail(prepared: PreparedRun, trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``; when Ray Train raises :class:`ray.train.TrainingFailedError` (2.60 does once the
    worker group's restarts are spent), :func:`fail_run`. A result that carries an error instead is
    :func:`finish_run`'s to fail."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        fail_run(prepared, error)


def select_best_checkpoint(result: ray.train.Result) -> tuple[ray.train.Checkpoint | None, dict]:
    """The kept checkpoint with the highest val AP and its metrics, or ``(None, {})`` when none has one."""
    scored = [(c, m) for c, m in (result.best_checkpoints or []) if m and VAL_AP in m]
    return max(scored, key=lambda item: item[1][VAL_AP]) if scored else (None, {})


def checkpoint_name(checkpoint: ray.train.Checkpoint) -> str:
    """The checkpoint's folder name in the run's storage folder (``checkpoint_<time>``), local or remote."""
    return Path(checkpoint.path).name


def registered_version_of(client: MlflowClient, run_id: str, checkpoint: str, model_name: str) -> str | None:
    """The version of registered model ``model_name`` that run ``run_id`` registered from its checkpoint folder
    named ``checkpoint``, or None when there is none (never registered from it, registered under another name,
    or that version deleted since), so rerunning a finished job, or `pipelines/register.py`, never registers
    the same checkpoint twice and never skips a registration that is not there. Errors other than "no such
    version" (MLflow down) propagate."""
    tags = client.get_run(run_id).data.tags
    version = tags.get(REGISTERED_VERSION_TAG) if tags.get(REGISTERED_CHECKPOINT_TAG) == checkpoint else None
    if version is None:
        return None
    try:
        found = client.get_model_version(model_name, version)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return version if found.run_id == run_id else None


def register_checkpoint(prepared: PreparedRun, checkpoint: ray.train.Checkpoint, val_ap: float) -> tuple[str, bool]:
    """Log the model of ``checkpoint`` to the prepared run, register it under ``tracking.model_name``, tag the
    run with the version and the checkpoint's name, and move ``tracking.alias`` when ``val_ap`` beats the
    aliased version's. Returns (version, aliased)."""
    with checkpoint.as_directory() as directory:
        return register_checkpoint_dir(prepared, directory, val_ap, checkpoint_name(checkpoint))


def register_checkpoint_dir(prepared: PreparedRun, directory: str | Path, val_ap: float, name: str) -> tuple[str, bool]:
    """:func:`register_checkpoint` for a checkpoint folder on this machine (``name``: its folder name in the
    run's storage folder)."""
    cfg = prepared.config
    state = load_checkpoint_state(directory)
    # The registered model is a pyfunc model of safetensors + JSON files (pipelines/serving.py), no pickle.
    with tempfile.TemporaryDirectory(prefix="sd-detr-model-") as model_dir:
        paths, example = write_checkpoint_model_files(
            model_dir, state["model"], cfg, cfg.data.val_dir, cfg.data.augmentation
        )
        # the run's tags name the version and the checkpoint before the alias step: if that fails, a rerun
        # finds the version (registered_version_of) and retries only the alias
        return register_model(
            prepared.tracking_uri, prepared.run_id, paths, example, cfg.tracking.model_name, cfg.tracking.alias,
            val_ap, {"epoch": int(state["epoch"]), VAL_AP: float(val_ap)}, {REGISTERED_CHECKPOINT_TAG: name},
        )  # fmt: skip


def finish_run(prepared: PreparedRun, result: ray.train.Result) -> TrainingOutcome:
    """Close the MLflow run of a fitted trainer: send what the workers could not log, register the best
    checkpoint's model and move the alias.

    Raises:
        TrainingFailed: training itself failed (the run is marked FAILED when MLflow answers).
        TrackingIncompleteError: training finished but MLflow stayed unreachable (after about a minute of
            retries, :data:`FINAL_FLUSH_DELAYS_S`): the unsent metrics stay in the run's storage folder and
            the message holds the `pipelines/register.py` command that logs them and registers the model.
    """
    if result.error is not None:
        fail_run(prepared, result.error)
    cfg = prepared.config
    client, outbox = open_outbox(prepared)
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
            before = registered_version_of(
                client, prepared.run_id, checkpoint_name(best_checkpoint), cfg.tracking.model_name
            )
            if before is not None:  # a rerun of a finished job: nothing new to register, the alias is retried
                outcome.registered_version, outcome.registered_before = before, True
                outcome.aliased = move_alias(
                    client, cfg.tracking.model_name, cfg.tracking.alias, before, float(best_metrics[VAL_AP])
                )
            else:
                outcome.registered_version, outcome.aliased = register_checkpoint(
                    prepared, best_checkpoint, float(best_metrics[VAL_AP])
                )
        client.set_terminated(prepared.run_id, status="FINISHED")
    except Exception as error:
        missing = [outbox.describe()] if outbox.pending or outbox.unsent_artifacts() else []
        if isinstance(error, AliasNotMovedError):
            outcome.registered_version = error.version
            missing.append(f"the @{cfg.tracking.alias} alias (version {error.version} is registered)")
        if register and outcome.registered_version is None:
            missing.append(f"the model of {outcome.checkpoint_path} (not registered)")
        command = f"python pipelines/register.py --checkpoint {outcome.checkpoint_path}"
        if not register:
            command += " --no-register"
        if isinstance(error, AliasNotMovedError) and error.needs_hand:
            problem, retry = f"its alias could not be moved safely: {error.cause}", "once fixed, run"
        else:
            problem = (
                f"MLflow at {prepared.tracking_uri} could not be reached to finish it "
                f"({type(error).__name__}: {str(error)[:200]})"
            )
            retry = "when MLflow is back, run"
        raise TrackingIncompleteError(
            f"training run {cfg.training.run_name!r} finished (checkpoints in {cfg.training.storage_path}/"
            f"{cfg.training.run_name}) but {problem}.\n  not done: {'; '.join(missing) or 'run status'}\n"
            f"  kept in: {outbox.storage.uri}\n  {retry}: {command}",
            outcome,
        ) from error
    return outcome


def log_summary(outcome: TrainingOutcome, cfg: TrainJobConfig) -> None:
    """Log the end-of-job summary at INFO (stdout under :func:`pipelines.cli.configure_logging`): best AP,
    checkpoint, registered version, MLflow run id."""
    lines = [
        "== sd-detr training finished",
        f"   best val AP   : {outcome.best_val_ap:.4f} (epoch {outcome.best_epoch})",
        f"   checkpoint    : {outcome.checkpoint_path}",
    ]
    if outcome.registered_version is not None:
        alias = f", alias @{cfg.tracking.alias} moved" if outcome.aliased else f", @{cfg.tracking.alias} kept"
        if outcome.registered_before:
            where = "points at it" if outcome.aliased else "kept"
            alias = (
                " (registered from this checkpoint by an earlier job of the run: not registered twice), "
                f"@{cfg.tracking.alias} {where}"
            )
        lines.append(f"   registered    : models:/{cfg.tracking.model_name}/{outcome.registered_version}{alias}")
    lines.append(f"   MLflow run id : {outcome.run_id}")
    logger.info("\n".join(lines))
