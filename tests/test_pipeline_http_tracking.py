"""A training run tracked on a real MLflow server over HTTP: proxied artifacts, registry lookup by alias."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from pipelines.inference import Predictor, list_images, load_checkpoint_model, load_registered_model
from pipelines.training import run_training
from tests.mlflow_server import session_server_root
from tests.pipeline_helpers import tiny_job_config

pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow]


def test_training_logs_to_a_tracking_server_and_registers_by_alias(
    ray_local,
    synthetic_root,
    mlflow_server,
    tmp_path,
    tmp_path_factory,
) -> None:
    name = f"http-{uuid.uuid4().hex[:6]}"
    cfg = tiny_job_config(
        tmp_path, synthetic_root, name, epochs=1,
        extra=[f"tracking.tracking_uri={mlflow_server}", f"tracking.experiment=exp-{name}", "scaling.num_workers=1"],
    )  # fmt: skip
    outcome = run_training(cfg)
    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED" and "val_AP" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    # this run's files reached the server's artifact store (not only some earlier test's)
    stored = session_server_root(tmp_path_factory) / "artifacts" / urlparse(run.info.artifact_uri).path.lstrip("/")
    assert (stored / "config.yaml").is_file() and outcome.run_id in stored.parts

    version = client.get_model_version_by_alias(cfg.tracking.model_name, "champion")
    assert str(version.version) == outcome.registered_version == "1"
    source = client.get_model_version_download_uri(cfg.tracking.model_name, "1")
    model_files = download_artifacts(artifact_uri=source, dst_path=str(tmp_path / "model"), tracking_uri=mlflow_server)
    assert (Path(model_files) / "MLmodel").is_file()
    registered = load_registered_model(f"models:/{cfg.tracking.model_name}@champion", mlflow_server)
    in_memory = load_checkpoint_model(outcome.checkpoint_path)
    images = [p.read_bytes() for p in list_images([synthetic_root / "images" / "val"])[:2]]
    for ours, theirs in zip(Predictor(registered)(images), Predictor(in_memory)(images), strict=True):
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-6)
    assert "MLFLOW_REGISTRY_URI" not in os.environ  # the pipeline left no global redirection behind
