"""MLflow bookkeeping of a hyper-parameter sweep (`tune/sweep.py`): its parent run (opened or resumed with the
same settings, summary metrics and tables, best-trial tags, closed), its trials' child runs closed from the Tune
outcome, and the best trial's checkpoint registered. Driver side only; knows nothing of Tune's search space."""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ray.train
from mlflow.tracking import MlflowClient

from pipelines.config import TrainJobConfig
from pipelines.metrics_outbox import RunStorage, TrackingOutbox, registered_checkpoint_epoch
from pipelines.run_guard import changed_settings
from pipelines.run_outcome import checkpoint_name, register_checkpoint, registered_version_of, select_best_checkpoint
from pipelines.run_setup import PreparedRun
from pipelines.tags import (
    BEST_PARAMS_TAG,
    BEST_RUN_ID_TAG,
    OUTCOME_TAG,
    PARENT_RUN_ID_TAG,
    REGISTERED_VERSION_TAG,
    SWEEP_TAG,
)
from pipelines.tracking import client_for, find_run, log_metrics, log_text_artifact, move_alias, start_or_resume_run
from sd_detr.names import VAL_AP

logger = logging.getLogger(__name__)

SUMMARY_FOLDER = "sweep"
"""Artifact folder of the parent run holding the trials' tables, the heat map and the best config."""

TrialStatus = Literal["finished", "stopped", "error"]
"""How a trial ended: trained all its epochs, stopped early by the scheduler (ASHA), or raised."""

_RUN_STATUS: dict[TrialStatus, str] = {"finished": "FINISHED", "stopped": "KILLED", "error": "FAILED"}


@dataclass(frozen=True)
class EndedTrial:
    """A trial whose MLflow run is to be closed: ``final_metrics`` are logged once, at ``final_step`` (its last
    epoch, 0-based)."""

    trial_id: str
    run_name: str
    status: TrialStatus
    final_metrics: dict[str, float]
    final_step: int


def open_sweep_run(
    client: MlflowClient,
    experiment_id: str,
    sweep_name: str,
    params: dict[str, str],
    fixed_prefixes: tuple[str, ...],
    searched: Collection[str],
) -> str:
    """Create the sweep's parent run (logging ``params``, the flattened sweep config) or resume it. Returns its id.

    A resumed sweep must keep every param starting with one of ``fixed_prefixes`` (its search space and what
    defines a trial); the ``searched`` config paths are exempt (each trial sets its own value).

    Raises:
        ValueError: the existing parent run was logged with other values of fixed params.
    """
    existing = find_run(client, experiment_id, sweep_name)
    if existing is not None:
        logged = client.get_run(existing).data.params
        changed = changed_settings(logged, params, fixed_prefixes, searched)
        if changed:
            raise ValueError(
                f"sweep {sweep_name!r} already exists with other settings ({', '.join(changed)} differ); "
                "rerun it with its original config or choose a new sweep.name"
            )
    run_id, _ = start_or_resume_run(client, experiment_id, sweep_name, params)
    client.set_tag(run_id, SWEEP_TAG, sweep_name)
    return run_id


def close_trial_runs(
    client: MlflowClient, experiment_id: str, trials: Sequence[EndedTrial], storage_path: str
) -> dict[str, str]:
    """Set each trial's MLflow run status and outcome tag from how it ended (a trial stopped by ASHA was killed
    before it could close its run) and log its final metrics. Returns trial id -> run id (trials that failed
    before creating a run are left out).

    A trial's worker sends an epoch's metrics only once Ray Train has registered that epoch's checkpoint, so a
    trial that ASHA stopped right after a report leaves that epoch in its outbox (in its storage folder): it
    is sent here, for every epoch whose checkpoint was registered."""
    run_ids = {}
    for trial in trials:
        run_id = find_run(client, experiment_id, trial.run_name)
        if run_id is None:
            continue
        run_ids[trial.trial_id] = run_id
        storage = RunStorage(storage_path, trial.run_name)
        outbox = TrackingOutbox.open(client, run_id, storage)
        outbox.flush(durable_through=registered_checkpoint_epoch(storage))
        if outbox.last_error is not None:
            logger.warning(
                "trial %s: not sent to MLflow (%s): %s", trial.trial_id, outbox.last_error, outbox.describe()
            )
        run = client.get_run(run_id)
        client.set_tag(run_id, OUTCOME_TAG, "stopped_by_asha" if trial.status == "stopped" else trial.status)
        logged = run.data.metrics
        if not all(_same_value(logged.get(key), value) for key, value in trial.final_metrics.items()):
            # a rerun of a finished sweep logs nothing twice; a retried (failed) trial logs its new end
            log_metrics(client, run_id, trial.final_metrics, step=trial.final_step)
        if run.info.status != _RUN_STATUS[trial.status]:
            client.set_terminated(run_id, status=_RUN_STATUS[trial.status])
    return run_ids


def _same_value(logged: float | None, value: float) -> bool:
    """Whether MLflow's latest value ``logged`` is ``value`` (NaN equals NaN: MLflow stores it as such)."""
    return logged is not None and (logged == value or (math.isnan(logged) and math.isnan(value)))


def close_interrupted_sweep(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    """Mark the runs a Ctrl+C cut short (parent and running trials) KILLED; resuming sets them RUNNING again."""
    for run in client.search_runs([experiment_id], f"tags.`{PARENT_RUN_ID_TAG}` = '{parent_run_id}'"):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, OUTCOME_TAG, "interrupted")
            client.set_terminated(run.info.run_id, status="KILLED")
    client.set_tag(parent_run_id, OUTCOME_TAG, "interrupted")
    client.set_terminated(parent_run_id, status="KILLED")


def log_sweep_summary(
    client: MlflowClient, parent_run_id: str, metrics: dict[str, float], texts: dict[str, str], files: Sequence[Path]
) -> None:
    """Log the summary ``metrics`` (step 0), the ``texts`` (file name -> content, e.g. the trials' tables) and the
    ``files`` (e.g. a heat map) into :data:`SUMMARY_FOLDER` of the parent run."""
    log_metrics(client, parent_run_id, metrics, step=0)
    for name, text in texts.items():
        log_text_artifact(client, parent_run_id, text, f"{SUMMARY_FOLDER}/{name}")
    for path in files:
        client.log_artifact(parent_run_id, str(path), artifact_path=SUMMARY_FOLDER)


def register_best_trial(
    trial_cfg: TrainJobConfig, run_id: str, uri: str, experiment_id: str
) -> tuple[str | None, bool]:
    """Register the best checkpoint of the best trial's Train run (``trial_cfg``, its config with its run name)
    in its MLflow run ``run_id``, once, and move ``tracking.alias`` as `pipelines/train.py` does: a rerun of a
    finished sweep reuses the version it registered and retries only the alias. Returns (version, whether
    ``tracking.alias`` points at it); (None, False) when the trial kept no scored checkpoint.

    Raises:
        AliasNotMovedError: the version is registered (the run tagged with it) but the alias step failed.
    """
    client = client_for(uri)
    tracking = trial_cfg.tracking
    storage = RunStorage(trial_cfg.training.storage_path, trial_cfg.training.run_name)
    checkpoint, metrics = select_best_checkpoint(ray.train.Result.from_path(storage.uri))
    if checkpoint is None:
        return None, False
    val_ap = float(metrics[VAL_AP])
    before = registered_version_of(client, run_id, checkpoint_name(checkpoint), tracking.model_name)
    if before is not None:
        return before, move_alias(client, tracking.model_name, tracking.alias, before, val_ap)
    prepared = PreparedRun(trial_cfg, uri, experiment_id, run_id, resumed=True)
    status = client.get_run(run_id).info.status
    try:
        return register_checkpoint(prepared, checkpoint, val_ap)
    finally:
        client.set_terminated(run_id, status=status)  # logging the model through MLflow's fluent API ends it FINISHED


def tag_best_trial(
    client: MlflowClient,
    parent_run_id: str,
    best_run_id: str,
    best_params: dict[str, Any],
    best_config_yaml: str,
    registered_version: str | None,
) -> None:
    """Point the parent run at the best trial: its run id, params, registered model version and, as the
    artifact ``<SUMMARY_FOLDER>/best_config.yaml``, its `pipelines/train.py` config."""
    log_text_artifact(client, parent_run_id, best_config_yaml, f"{SUMMARY_FOLDER}/best_config.yaml")
    client.set_tag(parent_run_id, BEST_RUN_ID_TAG, best_run_id)
    client.set_tag(parent_run_id, BEST_PARAMS_TAG, str(best_params))
    if registered_version is not None:
        client.set_tag(parent_run_id, REGISTERED_VERSION_TAG, registered_version)


def finish_sweep_run(client: MlflowClient, parent_run_id: str) -> None:
    """Close the parent run of a sweep that ran to the end."""
    client.set_tag(parent_run_id, OUTCOME_TAG, "finished")
    client.set_terminated(parent_run_id, status="FINISHED")
