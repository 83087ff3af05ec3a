"""MLflow wiring of the pipeline: fail-fast reachability check, experiment and run bookkeeping, metric and
artifact logging by run id (rank 0 / driver only), model registration and the champion alias."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils

RUN_NAME_TAG = "sd_detr.run_name"
AP_TAG = "val_AP"


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
        client.set_tag(existing, "sd_detr.resumed", "true")
        return existing, True
    tags = {RUN_NAME_TAG: run_name}
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    items = [Param(key, value[:6000]) for key, value in params.items()]
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


@contextlib.contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``uri`` for a block, then restore the previous
    state, including the ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` variables that ``set_*_uri`` export:
    a library call must not redirect later clients or child processes to another store."""
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)  # no public getter tells "unset"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def register_model(
    uri: str,
    run_id: str,
    model: torch.nn.Module,
    model_name: str,
    alias: str,
    val_ap: float,
    metadata: dict[str, Any],
) -> tuple[str, bool]:
    """Log ``model`` to ``run_id`` and register it under ``model_name``; move ``alias`` to the new version
    when its val AP beats the aliased version's (or no version has the alias). Returns (version, aliased)."""
    client = client_for(uri)
    with fluent_uris(uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model.cpu().eval(),
            name="model",
            registered_model_name=model_name,
            serialization_format="pickle",
            metadata=metadata,
        )
    version = str(info.registered_model_version)
    client.set_model_version_tag(model_name, version, AP_TAG, f"{val_ap:.6f}")
    try:
        current = client.get_model_version_by_alias(model_name, alias)
        current_ap = float(current.tags.get(AP_TAG, "-inf"))
    except Exception:  # no version carries the alias yet
        current, current_ap = None, float("-inf")
    aliased = current is None or val_ap > current_ap
    if aliased:
        client.set_registered_model_alias(model_name, alias, version)
    client.set_tag(run_id, "sd_detr.registered_version", version)
    return version, aliased


def log_text_artifact(client: MlflowClient, run_id: str, text: str, artifact_file: str) -> None:
    """Write ``text`` to ``artifact_file`` (a path inside the run's artifacts)."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(artifact_file).name
        path.write_text(text)
        folder = str(Path(artifact_file).parent)
        client.log_artifact(run_id, str(path), artifact_path=None if folder == "." else folder)
