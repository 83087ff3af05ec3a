"""Faults during a real training job on a local Ray: the MLflow server stops mid-run (and comes back, or
not), a Train worker is SIGKILLed inside an epoch. Nothing trained is lost, every epoch is logged once."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import pipelines.run_outcome
import pipelines.training
from pipelines.fault_injection import PROGRESS_DIR_ENV
from pipelines.metrics_outbox import OUTBOX_FILENAME, RunStorage, TrackingOutbox
from pipelines.run_outcome import TrackingIncompleteError, finish_run
from pipelines.tracking import client_for
from pipelines.training import run_training
from tests.mlflow_server import running_mlflow_server
from tests.pipeline_helpers import tiny_job_config

pytestmark = [pytest.mark.ray, pytest.mark.server, pytest.mark.slow]

EPOCH_KEYS = ("val_AP", "train_loss", "lr", "best_val_AP")


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _assert_every_epoch_once(client: MlflowClient, run_id: str, epochs: int) -> None:
    for key in EPOCH_KEYS:
        assert _steps(client, run_id, key) == list(range(epochs)), key


def _server_job(tmp_path: Path, synthetic_root: Path, name: str, url: str, epochs: int, extra=()):
    return tiny_job_config(
        tmp_path, synthetic_root, name, epochs=epochs,
        extra=[f"tracking.tracking_uri={url}", f"tracking.experiment=faults-{name}", *extra],
    )  # fmt: skip


def _progress(folder: Path) -> list[dict]:
    records = []
    for path in folder.glob("rank*.json"):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    return records


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Training(threading.Thread):
    """`run_training(cfg)` in a thread (the test thread plays the fault)."""

    def __init__(self, cfg) -> None:
        super().__init__(daemon=True)
        self.cfg, self.outcome, self.error = cfg, None, None

    def run(self) -> None:
        try:
            self.outcome = run_training(self.cfg)
        except BaseException as error:  # reported by the test
            self.error = error


def _wait_for_epoch0_in_mlflow(client: MlflowClient, experiment: str, job: Training) -> tuple[str, list[int]]:
    """Wait until the job's run (the only run of ``experiment``) holds epoch 0's val_AP; returns its run id and
    the epochs logged by then (rank 0 may have sent the next epoch in the same flush, if its checkpoint was
    registered by the time rank 0 read the controller's snapshot)."""
    run_ids: list[str] = []
    logged: list[int] = []

    def epoch0_logged() -> bool:
        if not run_ids:
            found = client.get_experiment_by_name(experiment)
            run_ids.extend(r.info.run_id for r in (client.search_runs([found.experiment_id]) if found else []))
        logged[:] = _steps(client, run_ids[0], "val_AP") if run_ids else []
        return 0 in logged

    _wait_for(lambda: epoch0_logged() or not job.is_alive(), 300, "epoch 0 in MLflow")
    return (run_ids[0] if run_ids else ""), list(logged)


def test_mlflow_outage_mid_run_costs_no_training_and_loses_no_metric(
    ray_local, synthetic_root, tmp_path, monkeypatch
) -> None:
    """Server stopped once epoch 0 is logged; training goes on through epoch 2 (whose logging attempt fails)
    into epoch 3, then the server starts again (same port and store): epochs 1-2 are sent from the outbox
    during training, every epoch is in the run once, the worker group never restarted, the model is
    registered; the run's dataset inputs and git commit are recorded (lineage)."""
    progress = tmp_path / "progress"
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(progress))
    root = tmp_path / "server"
    with contextlib.ExitStack() as first:
        url = first.enter_context(running_mlflow_server(root))
        cfg = _server_job(tmp_path, synthetic_root, "outage", url, epochs=4)
        job = Training(cfg)
        job.start()
        client = MlflowClient(url)
        first_run_id, logged = _wait_for_epoch0_in_mlflow(client, "faults-outage", job)
        assert job.error is None, job.error
        assert 2 not in logged, logged  # epoch 2 trains after epoch 0 is sent (at epoch 1's end at the latest)
    # The server is down now (the ExitStack stopped it). Epoch 1's metrics (unless sent with epoch 0) and
    # epoch 2's fail to send: keep the server down until epoch 3 trains.
    _wait_for(lambda: any(r["epoch"] >= 3 for r in _progress(progress)) or not job.is_alive(), 300, "epoch 3")
    assert job.is_alive(), job.error
    outbox = Path(cfg.training.storage_path) / "outage" / OUTBOX_FILENAME
    buffered = outbox.read_text()  # on disk while the server is away
    assert '"epoch": 2' in buffered and (1 in logged or '"epoch": 1' in buffered), (logged, buffered[:300])
    port = int(url.rsplit(":", 1)[1])
    with running_mlflow_server(root, port=port):
        job.join(timeout=600)
        assert not job.is_alive() and job.error is None, job.error
        outcome, run_id = job.outcome, first_run_id
        assert outcome.run_id == run_id
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        _assert_every_epoch_once(client, run_id, 4)
        assert client.get_metric_history(run_id, "resumed_from_epoch") == []  # no worker-group restart
        artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
        assert {f"plots/pr_curve_epoch{e:03d}.png" for e in range(4)} <= artifacts
        assert outcome.registered_version == "1" and outcome.aliased
        assert not (Path(cfg.training.storage_path) / "outage" / OUTBOX_FILENAME).exists()

        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"training", "validation"}
        for context, split, images in (("training", "train", 12), ("validation", "val", 6)):
            profile = json.loads(inputs[context].profile)
            assert inputs[context].name.endswith(split) and len(inputs[context].digest) == 20
            assert profile["num_images"] == images and profile["num_annotations"] > 0
            assert str(synthetic_root / split) in inputs[context].source
        commit = run.data.tags.get("mlflow.source.git.commit")
        assert commit is not None and len(commit) == 40


def test_mlflow_down_at_the_end_exits_nonzero_and_register_py_completes_the_run(
    ray_local, synthetic_root, tmp_path, monkeypatch
) -> None:
    """Server stopped after epoch 0 and back only after the job: the job ends with TrackingIncompleteError
    (train.py: exit 3) naming what was not logged; `pipelines/register.py --checkpoint` then sends it (once)
    and registers the model.

    The driver is held at the start of its final step until the server is down, so a fast machine cannot
    finish the run first; epoch 0 is in MLflow before the outage either way (sent by rank 0 once its
    checkpoint is registered, or else by the driver before it waits). Epoch 1 is usually still in the outbox
    then, but rank 0 sends it itself when the controller registered its checkpoint before rank 0's last read
    of the snapshot (a loaded machine): the test checks what was not logged at the outage, whichever it is.
    """
    from pipelines import register

    monkeypatch.setattr(pipelines.run_outcome, "FINAL_FLUSH_DELAYS_S", (1.0,))
    driver_held, server_down = threading.Event(), threading.Event()

    def finish_run_after_outage(prepared, result):
        storage = RunStorage(prepared.config.training.storage_path, prepared.config.training.run_name)
        TrackingOutbox.open(client_for(prepared.tracking_uri), prepared.run_id, storage).flush(durable_through=0)
        driver_held.set()
        assert server_down.wait(timeout=300), "the test did not stop the server"
        return finish_run(prepared, result)

    monkeypatch.setattr(pipelines.training, "finish_run", finish_run_after_outage)
    root = tmp_path / "server"
    with contextlib.ExitStack() as first:
        url = first.enter_context(running_mlflow_server(root))
        cfg = _server_job(tmp_path, synthetic_root, "late", url, epochs=2)
        job = Training(cfg)
        job.start()
        client = MlflowClient(url)
        _wait_for(lambda: driver_held.is_set() or not job.is_alive(), 300, "the driver's final step")
        assert job.error is None, job.error
        first_run_id, logged = _wait_for_epoch0_in_mlflow(client, "faults-late", job)
        assert logged in ([0], [0, 1]), logged
    server_down.set()
    job.join(timeout=600)
    assert isinstance(job.error, TrackingIncompleteError), job.error
    message = str(job.error)
    assert "not registered" in message and "pipelines/register.py --checkpoint" in message, message
    assert ("epochs 1" in message) == (logged == [0]), (logged, message)  # what was not logged is named
    checkpoint = job.error.outcome.checkpoint_path
    assert (Path(cfg.training.storage_path) / "late" / OUTBOX_FILENAME).exists() == (logged == [0])

    port = int(url.rsplit(":", 1)[1])
    with running_mlflow_server(root, port=port):
        register.main(["--checkpoint", checkpoint])
        run_id = first_run_id
        _assert_every_epoch_once(client, run_id, 2)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["sd_detr.registered_version"] == "1"
        version = client.get_model_version_by_alias(cfg.tracking.model_name, "champion")
        assert str(version.version) == "1" and version.run_id == run_id
        register.main(["--checkpoint", checkpoint])  # a second call changes nothing
        _assert_every_epoch_once(client, run_id, 2)
        assert len(client.search_model_versions(f"name='{cfg.tracking.model_name}'")) == 1


def test_sigkilled_worker_mid_epoch_resumes_from_the_last_checkpoint(
    ray_local, synthetic_root, tmp_path, monkeypatch
) -> None:
    """SIGKILL of a random rank at a random step inside epoch 1 (no cooperation from the worker): the group
    restarts from the newest registered checkpoint, no earlier epoch is trained again, and the MLflow run
    holds every epoch once."""
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    kill_rank, kill_step = rng.randrange(2), rng.randrange(1, 3)  # 3 steps per epoch: never at its end
    progress = tmp_path / "progress"
    monkeypatch.setenv(PROGRESS_DIR_ENV, str(progress))
    cfg = tiny_job_config(tmp_path, synthetic_root, "sigkill", epochs=3,
                          extra=["training.max_failures=1", "tracking.register_model=false"])  # fmt: skip
    job = Training(cfg)
    job.start()

    def at_kill_point() -> dict | None:
        for record in _progress(progress):
            if record["rank"] == kill_rank and record["epoch"] == 1 and record["step"] >= kill_step:
                return record
        return None

    _wait_for(lambda: at_kill_point() is not None or not job.is_alive(), 300, f"epoch 1 step {kill_step}")
    target = at_kill_point()
    assert target is not None, (job.error, seed)
    os.kill(target["pid"], signal.SIGKILL)
    job.join(timeout=600)
    assert job.error is None, (job.error, seed)
    client = MlflowClient(cfg.tracking.tracking_uri)
    run_id = job.outcome.run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    resumed = [(m.step, m.value) for m in client.get_metric_history(run_id, "resumed_from_epoch")]
    # epoch 0's checkpoint is the newest one; if the controller had not yet registered it at the kill,
    # the group restarts from scratch (nothing registered is lost either way)
    assert resumed in ([(1, 0.0)], []), (resumed, seed)
    _assert_every_epoch_once(client, run_id, 3)
    assert not any(p.name.startswith("fault_injected") for p in (Path(cfg.training.storage_path) / "sigkill").iterdir())
