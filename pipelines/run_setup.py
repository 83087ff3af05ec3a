"""Preparing a training run on the driver, before any cluster work: the backbone's initial weights checked,
the data resolved and checked, and the MLflow run (new or resumed) created with the job's config."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import REPO_ROOT, TrainJobConfig
from pipelines.metrics_outbox import RunStorage
from pipelines.run_guard import check_resume_compatible
from pipelines.tags import BACKBONE_INIT_TAG, GIT_COMMIT_TAG, RESUMED_CHANGES_TAG
from pipelines.tracking import (
    PARAM_VALUE_MAX_CHARS,
    check_reachable,
    client_for,
    get_or_create_experiment,
    git_commit,
    log_dataset_inputs,
    log_text_artifact,
    start_or_resume_run,
)
from sd_detr.backbone_weights import (
    backbone_init_tag,
    check_backbone_weights,
    random_backbone_warning,
    require_backbone_init,
)
from sd_detr.config import flatten_config
from sd_detr.data.builtin import ensure_synthetic_dataset
from sd_detr.data.meta import load_ground_truth, load_meta

logger = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
"""In the run's storage folder: the MLflow tracking URI, experiment and run id (for `pipelines/register.py`)."""


@dataclass
class PreparedRun:
    """A validated config with absolute paths and its MLflow run."""

    config: TrainJobConfig
    tracking_uri: str
    experiment_id: str
    run_id: str
    resumed: bool


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


RESUMED_CHANGES_MAX_CHARS = 5000
"""Longest :data:`RESUMED_CHANGES_TAG` value written (MLflow caps a tag's value at 8000 characters)."""


def resumed_changes(logged: dict[str, str], params: dict[str, str]) -> list[str]:
    """``key: old -> new`` for every param of the resuming job (``params``, flattened config) whose value
    differs from the run's ``logged`` param (both compared as MLflow stores them, cut to
    :data:`pipelines.tracking.PARAM_VALUE_MAX_CHARS`)."""
    stored = {key: value[:PARAM_VALUE_MAX_CHARS] for key, value in params.items()}
    return [
        f"{key}: {logged.get(key, '<absent>')} -> {value}"
        for key, value in sorted(stored.items())
        if logged.get(key) != value
    ]


def record_resumed_changes(client: MlflowClient, run_id: str, params: dict[str, str], config_yaml: str) -> None:
    """On a resumed run, tag :data:`RESUMED_CHANGES_TAG` with where this job's ``params`` differ from the run's
    (or ``none``; cut to :data:`RESUMED_CHANGES_MAX_CHARS`, the whole config being in the artifact) and, when
    they do, log its config as ``config_resumed.yaml``."""
    changes = resumed_changes(client.get_run(run_id).data.params, params)
    text = "\n".join(changes) if changes else "none"
    if len(text) > RESUMED_CHANGES_MAX_CHARS:
        more = f"\n... ({len(changes)} fields, see config_resumed.yaml)"
        text = text[: RESUMED_CHANGES_MAX_CHARS - len(more)] + more
    client.set_tag(run_id, RESUMED_CHANGES_TAG, text)
    if changes:
        log_text_artifact(client, run_id, config_yaml, "config_resumed.yaml")


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
    config_yaml = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    if not resumed:
        log_text_artifact(client, run_id, config_yaml, "config.yaml")
        log_dataset_inputs(client, run_id, cfg.data.train_dir, cfg.data.val_dir)
    else:
        record_resumed_changes(client, run_id, flatten_config(cfg), config_yaml)
    record = {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": run_id}
    RunStorage(cfg.training.storage_path, cfg.training.run_name).write_text(TRACKING_FILE, json.dumps(record))
    return PreparedRun(cfg, uri, experiment_id, run_id, resumed)
