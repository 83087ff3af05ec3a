"""The registration record of a run (`pipelines.run_outcome.registered_version_of`), on a real MLflow store:
what lets a rerun of a finished job, or `pipelines/register.py`, register a checkpoint once and only once."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipelines.run_outcome import registered_version_of
from pipelines.tags import REGISTERED_CHECKPOINT_TAG, REGISTERED_VERSION_TAG

CHECKPOINT = "checkpoint_2026-12-07_10-00-00.000000"


def _registered_run(client: MlflowClient, model_name: str) -> tuple[str, str]:
    """A run with one version of ``model_name`` registered from it and tagged as the job tags it."""
    experiment = client.create_experiment("e")
    run_id = client.create_run(experiment).info.run_id
    client.create_registered_model(model_name)
    version = client.create_model_version(model_name, f"runs:/{run_id}/model", run_id=run_id).version
    client.set_tag(run_id, REGISTERED_VERSION_TAG, str(version))
    client.set_tag(run_id, REGISTERED_CHECKPOINT_TAG, CHECKPOINT)
    return run_id, str(version)


def test_the_version_registered_from_the_same_checkpoint_is_found(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, version = _registered_run(client, "m")
    assert registered_version_of(client, run_id, CHECKPOINT, "m") == version == "1"


def test_another_checkpoint_another_model_name_or_a_deleted_version_is_not_registered(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id, version = _registered_run(client, "m")
    assert registered_version_of(client, run_id, "checkpoint_2026-12-07_11-00-00.000000", "m") is None
    assert registered_version_of(client, run_id, CHECKPOINT, "other-name") is None
    other_run = client.create_run(client.get_run(run_id).info.experiment_id).info.run_id
    client.set_tag(other_run, REGISTERED_VERSION_TAG, version)  # a version number that is not this run's
    client.set_tag(other_run, REGISTERED_CHECKPOINT_TAG, CHECKPOINT)
    assert registered_version_of(client, other_run, CHECKPOINT, "m") is None
    client.delete_model_version("m", version)
    assert registered_version_of(client, run_id, CHECKPOINT, "m") is None


def test_a_run_that_registered_nothing_has_no_version(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    assert registered_version_of(client, run_id, CHECKPOINT, "m") is None
