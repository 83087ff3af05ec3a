"""Closing a sweep's trial runs (`pipelines.sweep_tracking.close_trial_runs`) on a real MLflow store (SQLite): a
rerun of a finished sweep logs nothing twice, a retried trial's run shows the retry's end."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from pipelines.sweep_tracking import EndedTrial, close_trial_runs
from pipelines.tags import OUTCOME_TAG, RUN_NAME_TAG

RUN_NAME = "sweep-abc_00000-w1-s0"


def _trial(status: str, ap: float, step: int) -> EndedTrial:
    return EndedTrial("abc_00000", RUN_NAME, status, {"final_val_AP": ap, "epochs_done": float(step + 1)}, step)


def test_final_metrics_logged_once_and_again_when_a_retried_trial_ends_otherwise(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweep")
    run_id = client.create_run(experiment, tags={RUN_NAME_TAG: RUN_NAME}).info.run_id
    storage = str(tmp_path / "ray_results")  # no outbox, no checkpoints: nothing else to send

    assert close_trial_runs(client, experiment, [_trial("error", 0.05, 1)], storage) == {"abc_00000": run_id}
    assert client.get_run(run_id).info.status == "FAILED"
    close_trial_runs(client, experiment, [_trial("error", 0.05, 1)], storage)  # a rerun: nothing logged twice
    assert [m.value for m in client.get_metric_history(run_id, "final_val_AP")] == [0.05]

    client.update_run(run_id, status="RUNNING")  # the retried trial reopens its run and trains to the end
    close_trial_runs(client, experiment, [_trial("finished", 0.125, 3)], storage)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[OUTCOME_TAG] == "finished"
    assert run.data.metrics["final_val_AP"] == 0.125 and run.data.metrics["epochs_done"] == 4.0

    nan_trial = EndedTrial("abc_00000", RUN_NAME, "finished", {"final_val_AP": math.nan}, 3)
    close_trial_runs(client, experiment, [nan_trial], storage)
    close_trial_runs(client, experiment, [nan_trial], storage)  # NaN equals the NaN logged: not logged again
    assert len(client.get_metric_history(run_id, "final_val_AP")) == 3
