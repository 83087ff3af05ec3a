"""MLflow tag names the pipeline writes and reads back, defined once (runs and model versions)."""

from __future__ import annotations

from sd_detr.names import VAL_AP

# ---- run tags ----------------------------------------------------------------------------------------------
RUN_NAME_TAG = "sd_detr.run_name"
"""The job's ``training.run_name`` (or the sweep's name on a sweep's parent run): how a rerun finds its run."""
RESUMED_TAG = "sd_detr.resumed"
"""``"true"`` on a run that a later job resumed."""
RESUMED_CHANGES_TAG = "sd_detr.resumed_changes"
"""Where the config of the latest job that resumed the run differs from the run's params (``key: param -> now``
lines, or ``none``; MLflow params cannot change, so a run extended from 12 to 20 epochs keeps
``optimizer.epochs=12`` as its param and says 20 here); that job's whole config is the run's
``config_resumed.yaml`` artifact."""
BACKBONE_INIT_TAG = "sd_detr.backbone_init"
"""Where the backbone's initial weights came from."""
GIT_COMMIT_TAG = "mlflow.source.git.commit"
"""MLflow's own tag for the source commit."""
PARENT_RUN_ID_TAG = "mlflow.parentRunId"
"""MLflow's own tag nesting a run (a sweep's trial) under its parent."""
REGISTERED_VERSION_TAG = "sd_detr.registered_version"
"""Model-registry version registered from the run."""
REGISTERED_CHECKPOINT_TAG = "sd_detr.registered_checkpoint"
"""Name of the checkpoint directory that version was registered from."""

# ---- sweep tags (tune/) ------------------------------------------------------------------------------------
SWEEP_TAG = "sd_detr.tune.sweep"
"""On a sweep's parent run: the sweep's name."""
OUTCOME_TAG = "sd_detr.tune.outcome"
"""On a sweep's parent and trial runs: ``finished``, ``stopped_by_asha``, ``interrupted``, ... ."""
BEST_RUN_ID_TAG = "sd_detr.tune.best_run_id"
BEST_PARAMS_TAG = "sd_detr.tune.best_params"
TRIAL_ID_TAG = "sd_detr.tune.trial_id"
"""On a trial run: Ray Tune's trial id."""

# ---- model-version tags ------------------------------------------------------------------------------------
AP_TAG = VAL_AP
"""On a registered model version: its checkpoint's validation AP, formatted ``%.6f``."""
