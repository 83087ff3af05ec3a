"""pipelines/train.py end to end on a local Ray: tracking, registry, prediction, fault tolerance, resume."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
from mlflow.tracking import MlflowClient

import pipelines.training
from pipelines.inference import Predictor, list_images, load_checkpoint_model, load_registered_model
from pipelines.training import run_training
from tests.pipeline_helpers import REPO, tiny_job_config, tiny_job_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def plt_image_shape(path: str) -> tuple[int, ...]:
    """Shape of a PNG as matplotlib decodes it (fails on a broken file)."""
    return matplotlib.image.imread(path).shape


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_train_logs_registers_and_predicts_like_the_in_memory_model(ray_local, synthetic_root, tmp_path) -> None:
    cfg = tiny_job_config(tmp_path, synthetic_root, "e2e", epochs=2)
    outcome = run_training(cfg)
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.variant"] == "sd_detr" and run.data.params["optimizer.epochs"] == "2"
    assert [step for step, _ in _history(client, outcome.run_id, "val_AP")] == [0, 1]
    assert len(_history(client, outcome.run_id, "train_loss")) == 2
    for key in ("val_AP50", "val_ARl", "lr", "train_images_per_s", "train_loss_align", "train_data_wait_s"):
        assert key in run.data.metrics
    assert run.data.metrics["val_images"] == 6  # 2 workers, 3 val images each: every image evaluated once
    assert run.data.metrics["val_predict_seconds"] <= run.data.metrics["val_seconds"]
    artifacts = _artifact_paths(client, outcome.run_id)
    assert "config.yaml" in artifacts
    assert {"plots/pr_curve_epoch000.png", "plots/pr_curve_epoch001.png"} <= artifacts
    assert any(p.startswith("predictions/epoch001/") and p.endswith(".png") for p in artifacts)
    for key in ("val_score_iou_spearman", "val_score_iou_pearson", "val_best_regressed_recall"):
        assert len(_history(client, outcome.run_id, key)) == 2, key
    for epoch in (0, 1):
        attention = sorted(p for p in artifacts if p.startswith(f"attention/epoch{epoch:03d}/"))
        assert len(attention) == 2, artifacts
        local = client.download_artifacts(outcome.run_id, attention[0], str(tmp_path))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert plt_image_shape(local)[2] in (3, 4)
    assert outcome.registered_version == "1" and outcome.aliased
    version = client.get_model_version_by_alias(cfg.tracking.model_name, "champion")
    assert str(version.version) == "1" and version.run_id == outcome.run_id

    registered = load_registered_model(f"models:/{cfg.tracking.model_name}@champion", uri)
    in_memory = load_checkpoint_model(outcome.checkpoint_path)
    images = [p.read_bytes() for p in list_images([synthetic_root / "images" / "val"])[:3]]
    for ours, theirs in zip(Predictor(registered)(images), Predictor(in_memory)(images), strict=True):
        assert torch.equal(ours["labels"], theirs["labels"])
        assert torch.allclose(ours["scores"], theirs["scores"], atol=1e-6)
        assert torch.allclose(ours["boxes"], theirs["boxes"], atol=1e-4)


def test_killed_worker_resumes_from_checkpoint(ray_local, synthetic_root, tmp_path) -> None:
    cfg = tiny_job_config(
        tmp_path, synthetic_root, "fault", epochs=2,
        extra=["training.fault_injection.kill_after_epoch=1", "training.fault_injection.rank=1",
               "training.max_failures=1", "tracking.register_model=false"],
    )  # fmt: skip
    outcome = run_training(cfg)
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert (tmp_path / "ray_results" / "fault" / "fault_injected_after_epoch_1").exists()
    assert _history(client, outcome.run_id, "resumed_from_epoch") == [(1, 0.0)]
    assert [step for step, _ in _history(client, outcome.run_id, "val_AP")][-1] == 1


def test_a_worker_failure_past_max_failures_exits_1_marks_the_run_failed_and_a_rerun_resumes(
    ray_local, synthetic_root, tmp_path, capsys
) -> None:
    """Ray Train 2.60 raises a worker group's error from ``fit()``: the job turns it into one summary (the failed
    rank's error, where the checkpoints are) and exit code 1, not a traceback, and the MLflow run is FAILED, not
    left RUNNING. The same command then resumes from the last checkpoint (the fault fires once)."""
    from pipelines.train import main

    fault = ["training.fault_injection.kill_after_epoch=1", "training.fault_injection.rank=1",
             "training.max_failures=0", "tracking.register_model=false"]  # fmt: skip
    overrides = [*tiny_job_overrides(tmp_path, synthetic_root, "dies", epochs=2), *fault]
    with pytest.raises(SystemExit) as exit_info:
        main([arg for override in overrides for arg in ("--set", override)])
    assert exit_info.value.code == 1
    message = capsys.readouterr().err
    assert "training run 'dies' failed (after training.max_failures=0 restart(s)" in message
    assert "rank 1: " in message and "rerun the same command" in message
    assert "Traceback" not in message.split("training run 'dies' failed")[-1]
    cfg = tiny_job_config(tmp_path, synthetic_root, "dies", epochs=2, extra=fault)
    client = MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FAILED"
    assert [step for step, _ in _history(client, run.info.run_id, "val_AP")] == [0]
    outcome = run_training(cfg)
    assert outcome.run_id == run.info.run_id
    assert client.get_run(outcome.run_id).info.status == "FINISHED"
    assert _history(client, outcome.run_id, "resumed_from_epoch") == [(1, 0.0)]
    assert [step for step, _ in _history(client, outcome.run_id, "val_AP")] == [0, 1]


def test_rerunning_a_run_name_resumes_at_the_next_epoch(ray_local, synthetic_root, tmp_path, monkeypatch) -> None:
    first = run_training(tiny_job_config(tmp_path, synthetic_root, "resume", epochs=1))
    cfg = tiny_job_config(tmp_path, synthetic_root, "resume", epochs=2)
    second = run_training(cfg)
    client = MlflowClient(cfg.tracking.tracking_uri)
    assert second.run_id == first.run_id
    assert _history(client, second.run_id, "resumed_from_epoch") == [(1, 0.0)]
    assert [step for step, _ in _history(client, second.run_id, "val_AP")] == [0, 1]
    run = client.get_run(second.run_id)
    assert run.data.params["optimizer.epochs"] == "1"  # MLflow params cannot change: the tag says what did
    assert run.data.tags["sd_detr.resumed_changes"] == "optimizer.epochs: 1 -> 2"
    assert "config_resumed.yaml" in _artifact_paths(client, second.run_id)
    same_best = Path(second.checkpoint_path).name == Path(first.checkpoint_path).name
    assert second.registered_version == ("1" if same_best else "2")
    assert second.registered_before == same_best

    # the same job once more: both epochs are trained, so it trains nothing, starts no worker group and
    # registers nothing twice
    def no_trainer(*_args, **_kwargs):
        raise AssertionError("a fully trained run started a worker group")

    monkeypatch.setattr(pipelines.training, "build_trainer", no_trainer)
    third = run_training(cfg)
    assert third.run_id == first.run_id and third.registered_before
    assert third.registered_version == second.registered_version
    assert [step for step, _ in _history(client, third.run_id, "val_AP")] == [0, 1]
    versions = client.search_model_versions(f"name='{cfg.tracking.model_name}'")
    assert len(versions) == (1 if same_best else 2)
    assert client.get_run(third.run_id).info.status == "FINISHED"
    assert client.get_run(third.run_id).data.tags["sd_detr.resumed_changes"] == "optimizer.epochs: 1 -> 2"


def _run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "pipelines" / "train.py"), *args],
        capture_output=True, text=True, env={**os.environ, **env}, cwd=cwd, timeout=120,
    )  # fmt: skip


def test_invalid_config_exits_before_ray_starts(tmp_path) -> None:
    result = _run_cli(["--set", "model.transformer.num_heads=7", "--set", "loss.bbox_weight=-1"], {}, tmp_path)
    assert result.returncode == 2
    assert "num_heads" in result.stderr and "bbox_weight" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Ray" not in result.stdout + result.stderr and not (tmp_path / "ray_results").exists()


def test_unreachable_tracking_server_fails_fast(tmp_path, synthetic_root) -> None:
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    overrides = [
        o for o in tiny_job_overrides(tmp_path, synthetic_root, "offline") if not o.startswith("tracking.tracking_uri")
    ]
    args = [arg for override in overrides for arg in ("--set", override)]
    result = _run_cli(args, {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}, tmp_path)
    assert result.returncode == 2
    assert "not reachable" in result.stderr and f"127.0.0.1:{port}" in result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
