"""Resume safety and the job lock of `pipelines/train.py`, checked before Ray starts (no training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.checkpoint import CONFIG_FILE, METRICS_FILE
from pipelines.run_guard import compatibility_differences, job_lock, job_lock_path
from pipelines.run_setup import resolve_data
from sd_detr.config import flatten_config
from tests.pipeline_helpers import REPO, tiny_job_config, tiny_job_overrides


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipelines.training

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("Ray must not start")

    monkeypatch.setattr(pipelines.training, "ensure_ray", forbidden)


def _main_exit(overrides: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    from pipelines.train import main

    with pytest.raises(SystemExit) as exit_info:
        main([arg for override in overrides for arg in ("--set", override)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _write_checkpoint(tmp_path: Path, synthetic_root: Path, run_name: str, extra: list[str]) -> Path:
    """A checkpoint folder as Ray Train lays it out, holding the config.json of a job with ``extra``."""
    cfg = resolve_data(tiny_job_config(tmp_path, synthetic_root, run_name, extra=extra).with_absolute_paths())
    folder = tmp_path / "ray_results" / run_name / "checkpoint_2026-12-01_10-00-00.000000"
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_text(json.dumps(cfg.model_dump(mode="json")))
    return folder


def test_resuming_a_checkpoint_of_another_model_exits_2_naming_the_fields(no_ray, capsys, tmp_path, synthetic_root):
    folder = _write_checkpoint(tmp_path, synthetic_root, "changed", ["model.transformer.d_model=64"])
    err = _main_exit(tiny_job_overrides(tmp_path, synthetic_root, "changed"), capsys)
    assert "model.transformer.d_model: checkpoint '64', now '32'" in err, err
    assert folder.name in err and "training.run_name" in err and "delete" in err
    assert "Traceback" not in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # only reachability was checked: no run made
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_more_epochs_still_resume() -> None:
    old = {"optimizer.epochs": "1", "model.num_queries": "10", "training.seed": "0"}
    new = {"optimizer.epochs": "5", "model.num_queries": "10", "training.seed": "1"}
    assert compatibility_differences(old, new) == []
    assert compatibility_differences(old, {**new, "optimizer.lr": "0.1"}) == [("optimizer.lr", "<absent>", "0.1")]


def test_same_config_passes_the_check(tmp_path, synthetic_root) -> None:
    from pipelines.run_guard import check_resume_compatible

    _write_checkpoint(tmp_path, synthetic_root, "same", [])
    cfg = resolve_data(tiny_job_config(tmp_path, synthetic_root, "same", epochs=5).with_absolute_paths())
    check_resume_compatible(cfg)
    assert flatten_config(cfg)["optimizer.epochs"] == "5"


def test_fewer_epochs_than_the_run_has_trained_exits_2_before_ray(no_ray, capsys, tmp_path, synthetic_root):
    """A rerun of a run name whose checkpoint is after epoch 2 (3 epochs trained) with ``optimizer.epochs=2``
    would train nothing and report the longer run as the shorter one: it stops, saying how many epochs are
    trained and what to do."""
    folder = _write_checkpoint(tmp_path, synthetic_root, "longer", [])
    (folder / METRICS_FILE).write_text(json.dumps({"epoch": 2.0, "val_AP": 0.01}))
    err = _main_exit(tiny_job_overrides(tmp_path, synthetic_root, "longer", epochs=2), capsys)
    assert "has already trained 3 epochs" in err and "optimizer.epochs=2" in err, err
    assert folder.name in err and "training.run_name=NEW_NAME" in err and "above 3" in err
    assert "Traceback" not in err


def test_as_many_or_more_epochs_than_trained_pass_the_check(tmp_path, synthetic_root, caplog) -> None:
    from pipelines.run_guard import check_resume_compatible

    folder = _write_checkpoint(tmp_path, synthetic_root, "done", [])
    (folder / METRICS_FILE).write_text(json.dumps({"epoch": 2.0, "val_AP": 0.01}))
    with caplog.at_level("INFO", logger="pipelines.run_guard"):
        check_resume_compatible(
            resolve_data(tiny_job_config(tmp_path, synthetic_root, "done", epochs=3).with_absolute_paths())
        )
    assert "nothing to train" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="pipelines.run_guard"):
        check_resume_compatible(
            resolve_data(tiny_job_config(tmp_path, synthetic_root, "done", epochs=4).with_absolute_paths())
        )
    assert "nothing to train" not in caplog.text


def test_a_checkpoint_saved_before_a_config_field_existed_counts_with_its_old_value(tmp_path, synthetic_root) -> None:
    """A checkpoint config without ``model.taq_proposal_size`` was made with the then built-in 0.05: resuming it
    with today's default (0.2) would change the model, so the check refuses and names the field."""
    from pipelines.run_guard import IncompatibleCheckpointError, check_resume_compatible

    folder = _write_checkpoint(tmp_path, synthetic_root, "older", [])
    saved = json.loads((folder / CONFIG_FILE).read_text())
    del saved["model"]["taq_proposal_size"]
    (folder / CONFIG_FILE).write_text(json.dumps(saved))
    cfg = resolve_data(tiny_job_config(tmp_path, synthetic_root, "older").with_absolute_paths())
    with pytest.raises(IncompatibleCheckpointError, match=r"model.taq_proposal_size: checkpoint '0.05', now '0.2'"):
        check_resume_compatible(cfg)


def test_a_second_job_on_the_same_run_name_exits_2_naming_the_holder(no_ray, capsys, tmp_path, synthetic_root):
    cfg = tiny_job_config(tmp_path, synthetic_root, "busy").with_absolute_paths()
    with job_lock(cfg):
        err = _main_exit(tiny_job_overrides(tmp_path, synthetic_root, "busy"), capsys)
    assert f"pid {os.getpid()}" in err and "busy" in err and "Traceback" not in err
    assert not job_lock_path(cfg).exists()  # released at the end of the block


def test_a_killed_job_does_not_leave_its_lock_stuck(tmp_path, synthetic_root) -> None:
    cfg = tiny_job_config(tmp_path, synthetic_root, "crashed").with_absolute_paths()
    script = (
        "import sys, time\n"
        "from pipelines.config import TrainJobConfig\n"
        "from pipelines.run_guard import job_lock\n"
        "cfg = TrainJobConfig.model_validate_json(sys.argv[1])\n"
        "with job_lock(cfg):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, cfg.model_dump_json()], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        from sd_detr.data.lock import LockHeldError

        with pytest.raises(LockHeldError, match=f"pid {holder.pid}"), job_lock(cfg):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    time.sleep(0.1)
    with job_lock(cfg) as path:  # the kernel released the dead holder's flock
        assert path.exists()


def test_resumed_changes_list_what_the_resuming_job_changed() -> None:
    from pipelines.run_setup import resumed_changes

    logged = {"optimizer.epochs": "12", "scaling.num_workers": "2", "model.num_queries": "30"}
    params = {"optimizer.epochs": "20", "scaling.num_workers": "2", "model.num_queries": "30", "new.field": "x"}
    assert resumed_changes(logged, params) == ["new.field: <absent> -> x", "optimizer.epochs: 12 -> 20"]
    assert resumed_changes(logged, {**logged}) == []
    assert resumed_changes({"a": "v" * 6000}, {"a": "v" * 7000}) == []  # compared as MLflow stores them


def test_resumed_changes_are_tagged_within_mlflow_s_limit_and_the_config_logged(tmp_path) -> None:
    from mlflow.tracking import MlflowClient

    from pipelines.run_setup import RESUMED_CHANGES_MAX_CHARS, record_resumed_changes

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_param(run_id, "optimizer.epochs", "12")
    record_resumed_changes(client, run_id, {"optimizer.epochs": "12"}, "unchanged: true\n")
    assert client.get_run(run_id).data.tags["sd_detr.resumed_changes"] == "none"
    assert [a.path for a in client.list_artifacts(run_id)] == []
    params = {"optimizer.epochs": "20", **{f"field.{i}": "x" * 100 for i in range(100)}}
    record_resumed_changes(client, run_id, params, "optimizer:\n  epochs: 20\n")
    tag = client.get_run(run_id).data.tags["sd_detr.resumed_changes"]
    assert len(tag) <= RESUMED_CHANGES_MAX_CHARS and tag.endswith("(101 fields, see config_resumed.yaml)")
    assert tag.startswith("field.0: <absent> -> xxx")
    assert [a.path for a in client.list_artifacts(run_id)] == ["config_resumed.yaml"]


@pytest.mark.parametrize("with_config_file", [True, False], ids=["config.json", "state.pt only"])
def test_a_checkpoint_saved_before_a_config_field_existed_loads_for_inference_as_it_was_trained(
    tmp_path, synthetic_root, with_config_file: bool
) -> None:
    """evaluate.py / predict.py on such a checkpoint build the model it was trained as (proposals of side 0.05):
    the side is no weight, so a model built with today's default would load its weights silently."""
    import torch

    from pipelines.checkpoint import CHECKPOINT_FILE
    from pipelines.inference import load_checkpoint_model
    from sd_detr.model import build_detector

    folder = _write_checkpoint(tmp_path, synthetic_root, "older", [])
    saved = json.loads((folder / CONFIG_FILE).read_text())
    del saved["model"]["taq_proposal_size"]
    cfg = resolve_data(tiny_job_config(tmp_path, synthetic_root, "older").with_absolute_paths())
    torch.save({"model": build_detector(cfg.model).state_dict(), "config": json.dumps(saved)}, folder / CHECKPOINT_FILE)
    if with_config_file:
        (folder / CONFIG_FILE).write_text(json.dumps(saved))
    else:
        (folder / CONFIG_FILE).unlink()
    loaded = load_checkpoint_model(folder)
    assert loaded.model.config.taq_proposal_size == 0.05
    assert loaded.model.decoding.query_generator.proposal_size == 0.05
