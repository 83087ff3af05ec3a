"""MLflow wiring of the pipeline: fail-fast reachability check, experiment and run bookkeeping, metric and
artifact logging by run id (rank 0 / driver only), model registration (a pyfunc model without pickle, see
`pipelines/serving.py`) and the champion alias."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from pipelines.mlflow_uris import fluent_uris
from pipelines.serving import log_pyfunc_model
from pipelines.tags import AP_TAG, PARENT_RUN_ID_TAG, REGISTERED_VERSION_TAG, RESUMED_TAG, RUN_NAME_TAG

logger = logging.getLogger(__name__)


class TrackingUnavailableError(RuntimeError):
    """The MLflow tracking server cannot be reached (raised before any training starts)."""


def client_for(uri: str) -> MlflowClient:
    """An MlflowClient bound to ``uri`` (tracking and registry)."""
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`TrackingUnavailableError` with a clear message when ``uri`` does not answer quickly.

    HTTP servers get a bounded timeout and no retries, so an unreachable server fails in seconds.
    """
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    try:
        client_for(uri).search_experiments(max_results=1)
    except Exception as error:  # any transport/store error means we cannot track this run
        raise TrackingUnavailableError(
            f"MLflow tracking store {uri!r} is not reachable ({type(error).__name__}: {str(error)[:300]}). "
            "Start the server or set MLFLOW_TRACKING_URI / tracking.tracking_uri to a reachable store."
        ) from error


def get_or_create_experiment(client: MlflowClient, name: str, artifact_root: Path, uri: str) -> str:
    """Experiment id of ``name``; created with an absolute artifact location on local stores (a tracking
    server with ``--serve-artifacts`` chooses its own)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None if uri.startswith(("http://", "https://")) else artifact_root.resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def find_run(client: MlflowClient, experiment_id: str, run_name: str) -> str | None:
    """The id of the newest run tagged with ``run_name`` (for resuming), or None."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", order_by=["start_time DESC"]
    )
    return runs[0].info.run_id if runs else None


PARAM_VALUE_MAX_CHARS = 6000
"""Longest param value logged (MLflow's limit); longer values are cut to it."""


def start_or_resume_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    params: dict[str, str],
    parent_run_id: str | None = None,
) -> tuple[str, bool]:
    """(run id, resumed): reuse the run of ``run_name`` if one exists, else create it and log ``params``."""
    existing = find_run(client, experiment_id, run_name)
    if existing is not None:
        client.update_run(existing, status="RUNNING")
        client.set_tag(existing, RESUMED_TAG, "true")
        return existing, True
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id is not None:
        tags[PARENT_RUN_ID_TAG] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(key, value[:PARAM_VALUE_MAX_CHARS]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id, False


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log numeric metrics in one batch at ``step``."""
    timestamp = int(time.time() * 1000)
    entries = [
        Metric(key, float(value), timestamp, step)
        for key, value in metrics.items()
        if isinstance(value, (int, float))  # NaN (an undefined diagnostic) is stored as NaN by MLflow
    ]
    if entries:
        client.log_batch(run_id, metrics=entries)


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """Where to look at the run: the UI URL for a server, an ``mlflow ui`` command for a local store."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {uri}  (then open experiment {experiment_id}, run {run_id})"


class AliasUpdateError(RuntimeError):
    """The alias could not be compared or moved safely; the registered version exists, the alias is unchanged
    (or, after a concurrent move, points elsewhere)."""


def current_alias_holder(client: MlflowClient, model_name: str, alias: str) -> tuple[str, float] | None:
    """(version, val AP) of the version that ``alias`` points at, or None when the model has no such alias.

    "No such alias" is read from the registered model's alias list, never inferred from an error: any
    failure to read the model or the aliased version (timeout, 5xx, permission) propagates.

    Raises:
        AliasUpdateError: the aliased version has no readable ``val_AP`` tag (set by hand?), so there is
            nothing to compare against.
    """
    aliases = client.get_registered_model(model_name).aliases or {}
    if alias not in aliases:
        return None
    version = str(aliases[alias])
    tag = client.get_model_version(model_name, version).tags.get(AP_TAG)
    try:
        return version, float(tag)
    except (TypeError, ValueError):
        raise AliasUpdateError(
            f"{model_name}@{alias} is version {version}, whose {AP_TAG} tag is {tag!r}, not a number: cannot "
            f"compare. Set the tag (MlflowClient().set_model_version_tag({model_name!r}, {version!r}, "
            f"{AP_TAG!r}, '<AP>')) or move the alias by hand."
        ) from None


def update_alias(client: MlflowClient, model_name: str, alias: str, version: str, val_ap: float) -> bool:
    """Point ``alias`` at ``version`` when ``val_ap`` beats the aliased version's AP (or nothing has the alias);
    re-read the alias afterwards. Returns whether the alias points at ``version`` (moved now, or already).

    Raises:
        AliasUpdateError: the current holder's AP is unreadable, or the alias does not point at ``version``
            after setting it (another job moved it in between).
        MlflowException: reading or setting the alias failed; the alias was not moved by this call.
    """
    current = current_alias_holder(client, model_name, alias)
    if current is not None and current[0] == str(version):  # a retry after the alias moved: nothing to do
        logger.info("%s@%s already points at version %s", model_name, alias, version)
        return True
    if current is not None and not val_ap > current[1]:
        logger.info("%s@%s stays at version %s (AP %.4f >= %.4f)", model_name, alias, current[0], current[1], val_ap)
        return False
    client.set_registered_model_alias(model_name, alias, version)
    now = client.get_model_version_by_alias(model_name, alias)
    if str(now.version) != version:
        raise AliasUpdateError(
            f"{model_name}@{alias} was set to version {version} but now points at version {now.version} "
            "(moved concurrently?); check the registry."
        )
    logger.info("%s@%s -> version %s (AP %.4f)", model_name, alias, version, val_ap)
    return True


class AliasNotMovedError(RuntimeError):
    """``version`` of ``model_name`` is registered (and its run tagged with it), but moving ``alias`` failed:
    the holder's AP could not be read or compared (:class:`AliasUpdateError`, the cause) or MLflow failed.
    Retrying (the job or `pipelines/register.py`) reuses the version and tries the alias again."""

    def __init__(self, model_name: str, version: str, alias: str, cause: Exception) -> None:
        super().__init__(
            f"{model_name} version {version} is registered, but @{alias} was not compared or moved "
            f"({type(cause).__name__}: {str(cause)[:300]})"
        )
        self.version, self.cause = version, cause

    @property
    def needs_hand(self) -> bool:
        """True when the registry itself must be fixed first (the holder's AP unreadable, the alias moved
        concurrently: :class:`AliasUpdateError`); False when MLflow failed and a plain retry may do."""
        return isinstance(self.cause, AliasUpdateError)


def move_alias(client: MlflowClient, model_name: str, alias: str, version: str, val_ap: float) -> bool:
    """:func:`update_alias` for a registered ``version``; any failure is raised as :class:`AliasNotMovedError`."""
    try:
        return update_alias(client, model_name, alias, version, val_ap)
    except Exception as error:
        raise AliasNotMovedError(model_name, version, alias, error) from error


def register_model(
    uri: str,
    run_id: str,
    artifact_paths: Mapping[str, str],
    input_image: bytes,
    model_name: str,
    alias: str,
    val_ap: float,
    metadata: dict[str, Any],
    run_tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Log the pyfunc model of ``artifact_paths`` (`pipelines/model_artifact.py` files) to ``run_id``, register
    it under ``model_name``, tag the version with ``val_ap`` and the run with the version (and ``run_tags``),
    then move ``alias`` to it when its val AP beats the aliased version's (see :func:`update_alias`). Returns
    (version, whether the alias points at it).

    ``input_image`` (encoded bytes) becomes the model's input example; ``metadata`` goes into its MLmodel file.

    Raises:
        AliasNotMovedError: the version is registered and tagged, the alias step failed.
    """
    client = client_for(uri)
    with fluent_uris(uri), mlflow.start_run(run_id=run_id):
        info = log_pyfunc_model(artifact_paths, input_image, registered_model_name=model_name, metadata=metadata)
    version = str(info.registered_model_version)
    client.set_model_version_tag(model_name, version, AP_TAG, f"{val_ap:.6f}")
    for key, value in {REGISTERED_VERSION_TAG: version, **(run_tags or {})}.items():
        client.set_tag(run_id, key, value)
    return version, move_alias(client, model_name, alias, version, val_ap)


def log_text_artifact(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    """Write ``text`` to ``artifact_file`` (a path inside the run's artifacts)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(artifact_file).name
        path.write_text(text)
        folder = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), artifact_path=None if folder == "." else folder)


DATASET_DIGEST_LENGTH = 20


def dataset_input(dataset_dir: Path, context: str) -> DatasetInput:
    """The MLflow dataset input of a shard directory: named after the directory (and split), digest = the
    first :data:`DATASET_DIGEST_LENGTH` hex digits of the SHA-256 of its ``_meta.json`` (which lists the shard
    files, categories and counts), source = the directory, profile = image/annotation/shard counts.
    ``context`` is "training" or "validation" (shown in the run's Datasets panel)."""
    from sd_detr.data.meta import META_FILENAME, load_meta

    dataset_dir = Path(dataset_dir).resolve()
    meta = load_meta(dataset_dir)
    digest = hashlib.sha256((dataset_dir / META_FILENAME).read_bytes()).hexdigest()[:DATASET_DIGEST_LENGTH]
    profile = {
        "num_images": meta.counts.images,
        "num_annotations": meta.counts.annotations,
        "num_crowd_annotations": meta.counts.crowd_annotations,
        "num_shards": meta.counts.shards,
        "num_categories": meta.num_classes,
        "origin": meta.source,
    }
    name = dataset_dir.parent.name + "/" + dataset_dir.name if dataset_dir.parent.name else dataset_dir.name
    dataset = Dataset(
        name=name,
        digest=digest,
        source_type="local",
        source=json.dumps({"uri": dataset_dir.as_uri()}),
        profile=json.dumps(profile),
    )
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def log_dataset_inputs(client: MlflowClient, run_id: str, train_dir: Path, val_dir: Path) -> None:
    """Record the train and val shard directories as the run's dataset inputs (lineage)."""
    client.log_inputs(run_id, datasets=[dataset_input(train_dir, "training"), dataset_input(val_dir, "validation")])


def git_commit(directory: Path) -> str | None:
    """The commit checked out in ``directory`` (``git rev-parse HEAD``), or None when it is no git checkout
    (e.g. a `ray job submit` working-dir copy) or git is not installed."""
    try:
        result = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None
