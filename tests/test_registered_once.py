"""The registration record of a run (`pipelines.run_outcome.registered_version_of`), on a real MLflow store:
what lets a rerun of a finished job, or `pipelines/register.py`, register a checkpoint once and only once."""

from __future__ import annotations

import pytest
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


def test_a_failed_alias_step_leaves_the_version_findable_and_a_retry_moves_only_the_alias(tmp_path) -> None:
    """The version and checkpoint tags are set before the alias step: when it fails (here the champion's
    val_AP tag is not a number), a rerun finds the version instead of registering the checkpoint again."""
    from pipelines.serving import example_image
    from pipelines.tags import AP_TAG
    from pipelines.tracking import AliasNotMovedError, AliasUpdateError, move_alias, register_model
    from tests.registry_helpers import tiny_model_files

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    paths, _ = tiny_model_files(tmp_path / "model")

    def register(run_id: str, val_ap: float) -> tuple[str, bool]:
        return register_model(uri, run_id, paths, example_image(), "m", "champion", val_ap, {"val_AP": val_ap},
                              {REGISTERED_CHECKPOINT_TAG: CHECKPOINT})  # fmt: skip

    first_run = client.create_run(experiment).info.run_id
    assert register(first_run, 0.3) == ("1", True)
    client.set_model_version_tag("m", "1", AP_TAG, "n/a")  # set by hand: nothing to compare against
    run_id = client.create_run(experiment).info.run_id
    with pytest.raises(AliasNotMovedError, match="m version 2 is registered, but @champion was not") as failed:
        register(run_id, 0.5)
    assert failed.value.version == "2" and isinstance(failed.value.cause, AliasUpdateError)
    assert registered_version_of(client, run_id, CHECKPOINT, "m") == "2"
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    client.set_model_version_tag("m", "1", AP_TAG, "0.3")  # the registry fixed: the retry moves only the alias
    assert move_alias(client, "m", "champion", "2", 0.5)
    assert move_alias(client, "m", "champion", "2", 0.5)  # already there: nothing to do, still True
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    assert len(client.search_model_versions("name='m'")) == 2
