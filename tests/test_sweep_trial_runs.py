"""Closing a sweep's trial runs (`pipelines.sweep_tracking.close_trial_runs`) on a real MLflow store (SQLite): a
rerun of a finished sweep logs nothing twice, a retried trial's run shows the retry's end."""

from __future__ import annotations

import math
import re

import pytest
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


def test_the_best_trial_is_registered_once_and_a_failed_alias_step_is_retried(tmp_path, monkeypatch) -> None:
    """`register_best_trial` on a trial run that already registered its best checkpoint (a rerun of a finished
    sweep): no second version; the alias is compared again, and a failed comparison is raised with the version."""
    import pipelines.sweep_tracking as sweep_tracking
    from pipelines.tags import AP_TAG, REGISTERED_CHECKPOINT_TAG, REGISTERED_VERSION_TAG
    from pipelines.tracking import AliasNotMovedError
    from tests.test_tune_sweep import _sweep_config
    from tune.config import build_trial_config

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweep")
    run_id = client.create_run(experiment, tags={RUN_NAME_TAG: RUN_NAME}).info.run_id
    client.create_registered_model("m")
    champion = client.create_model_version("m", "runs:/other/model", run_id=None).version  # its val_AP unreadable
    client.set_model_version_tag("m", champion, AP_TAG, "n/a")
    client.set_registered_model_alias("m", "champion", champion)
    mine = client.create_model_version("m", f"runs:/{run_id}/model", run_id=run_id).version
    client.set_tag(run_id, REGISTERED_VERSION_TAG, str(mine))
    checkpoint = tmp_path / "ray_results" / RUN_NAME / "checkpoint_2026-12-07_10-00-00.000000"
    client.set_tag(run_id, REGISTERED_CHECKPOINT_TAG, checkpoint.name)

    class Kept:  # the trial's best kept checkpoint, as Ray Train's Result lists it
        path = str(checkpoint)

    monkeypatch.setattr(sweep_tracking.ray.train.Result, "from_path", staticmethod(lambda _uri: None))
    monkeypatch.setattr(sweep_tracking, "select_best_checkpoint", lambda _result: (Kept(), {"val_AP": 0.3}))
    base = _sweep_config([f"training.storage_path={tmp_path / 'ray_results'}", "tracking.model_name=m"])
    trial_cfg = build_trial_config(base.job_config_dict(), {}, RUN_NAME)

    with pytest.raises(AliasNotMovedError, match="whose val_AP tag is 'n/a'") as failed:
        sweep_tracking.register_best_trial(trial_cfg, run_id, uri, experiment)
    assert failed.value.version == str(mine) and failed.value.needs_hand
    client.set_model_version_tag("m", champion, AP_TAG, "0.1")  # the registry fixed by hand; the sweep rerun
    assert sweep_tracking.register_best_trial(trial_cfg, run_id, uri, experiment) == (str(mine), True)
    assert client.get_model_version_by_alias("m", "champion").version == mine
    assert len(client.search_model_versions("name='m'")) == 2  # nothing registered twice


def test_a_sweep_whose_alias_step_failed_exits_3_and_says_what_to_rerun(monkeypatch, capsys) -> None:
    import tune.sweep
    from pipelines.cli import TRACKING_INCOMPLETE_EXIT_CODE
    from pipelines.tracking import AliasNotMovedError, AliasUpdateError
    from tune.report import TrialRow

    params = {"loss.align_loss_weight": 1.0, "model.query_split": 0}
    best = TrialRow("abc_00000", RUN_NAME, params, "finished", 2, 0.2, 0.2, 1)
    failed = AliasNotMovedError("m", "2", "champion", AliasUpdateError("m@champion's val_AP tag is 'n/a'"))
    outcome = tune.sweep.SweepOutcome("parent", "/tmp/x", False, False, [best], 1, best=best, best_run_id="run",
                                      registered_version="2", alias_error=failed)  # fmt: skip
    monkeypatch.setattr(tune.sweep, "run_sweep", lambda _cfg: outcome)
    with pytest.raises(SystemExit) as stop:
        tune.sweep.main([])
    assert stop.value.code == TRACKING_INCOMPLETE_EXIT_CODE
    captured = capsys.readouterr()
    assert (
        "models:/m/2" not in captured.err
        and "m version 2 is registered, but @champion was not compared" in captured.err
    )
    assert "once the registry is fixed, rerun the same command" in captured.err
    assert "@champion NOT compared or moved" in captured.out


def test_a_resumed_sweep_keeps_its_search_scheduler_and_concurrency(tmp_path) -> None:
    """`Tuner.restore` reuses the ASHA settings and concurrency it saved: changing them on a rerun is refused, as
    is a changed search space; data, scaling and storage settings may change."""
    from pipelines.sweep_tracking import open_sweep_run
    from sd_detr.config import flatten_config
    from tests.test_tune_sweep import _sweep_config
    from tune.config import RESUME_FIXED_PREFIXES

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("sweep")
    searched = {"loss.align_loss_weight", "model.query_split"}

    def reopen(*overrides: str) -> str:
        params = flatten_config(_sweep_config(list(overrides)))
        return open_sweep_run(client, experiment, "s", params, RESUME_FIXED_PREFIXES, searched)

    first = reopen()
    assert reopen("scaling.cpus_per_worker=0.4", "data.loader.batch_size=4") == first
    for override, field in (
        ("sweep.asha.grace_period=1", "sweep.asha.grace_period"),
        ("sweep.max_concurrent_trials=2", "sweep.max_concurrent_trials"),
        ("sweep.align_loss_weight.values=[1.0]", "sweep.align_loss_weight.values"),
    ):
        with pytest.raises(ValueError, match=rf"already exists with other settings \({re.escape(field)} differ\)"):
            reopen(override)


def test_a_resumed_sweep_is_checked_against_its_storage_even_in_another_mlflow_experiment(
    tmp_path, monkeypatch, capsys
) -> None:
    """The settings a sweep started with are recorded in its Tune storage: a rerun that would restore that Tune
    state with another model (or search space) exits 2 before MLflow and Ray, even when it logs to another
    MLflow experiment (where no parent run holds the old settings); data, scaling and tracking may change."""
    import tune.sweep
    from pipelines.run_guard import SWEEP_SETTINGS_FILE, check_sweep_settings, record_sweep_settings
    from sd_detr.config import flatten_config
    from tests.test_tune_sweep import _sweep_config
    from tune.config import RESUME_FIXED_PREFIXES

    storage = str(tmp_path / "ray_results")
    base = [f"sweep.storage_path={storage}", "sweep.name=s"]
    searched = {"loss.align_loss_weight", "model.query_split"}
    started = _sweep_config(base)
    record_sweep_settings(storage, "s", flatten_config(started), RESUME_FIXED_PREFIXES)
    assert (tmp_path / "ray_results" / "s" / SWEEP_SETTINGS_FILE).is_file()

    def check(*overrides: str) -> None:
        params = flatten_config(_sweep_config([*base, *overrides]))
        check_sweep_settings(storage, "s", params, RESUME_FIXED_PREFIXES, searched)

    check("tracking.experiment=elsewhere", "data.loader.batch_size=4", "scaling.cpus_per_worker=0.4")
    with pytest.raises(
        ValueError, match=rf"other settings: model\.num_queries \('{started.model.num_queries}' -> '7'\)"
    ):
        check("model.num_queries=7")
    with pytest.raises(ValueError, match=r"sweep\.align_loss_weight\.values"):
        check("sweep.align_loss_weight.values=[1.0]")
    check_sweep_settings(storage, "new-sweep", flatten_config(started), RESUME_FIXED_PREFIXES, searched)

    def unreachable(*_args, **_kwargs):
        raise AssertionError("the sweep went on to MLflow or Ray")

    monkeypatch.setattr(tune.sweep.ray.tune.Tuner, "can_restore", staticmethod(lambda path: path.endswith("/s")))
    monkeypatch.setattr(tune.sweep, "check_reachable", unreachable)
    monkeypatch.setattr(tune.sweep, "ensure_ray", unreachable)
    with pytest.raises(SystemExit) as stop:
        overrides = [*base, "model.num_queries=7", "tracking.experiment=elsewhere"]
        tune.sweep.main([arg for override in overrides for arg in ("--set", override)])
    assert stop.value.code == 2
    assert "sweep 's'" in capsys.readouterr().err
