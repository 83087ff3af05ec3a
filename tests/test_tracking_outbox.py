"""The durable MLflow outbox (`pipelines/metrics_outbox.py`) against a real tracking store: buffered while
the store fails, sent once when it answers again, replayable from the file by a later process."""

from __future__ import annotations

import math

from mlflow.tracking import MlflowClient

from pipelines.metrics_outbox import OUTBOX_FILENAME, RunStorage, TrackingOutbox


class FailingClient:
    """An MlflowClient stand-in whose calls fail like an unreachable server."""

    def log_batch(self, *args, **kwargs):
        raise ConnectionError("connection refused")

    def log_artifacts(self, *args, **kwargs):
        raise ConnectionError("connection refused")


def test_outbox_keeps_batches_through_an_outage_and_sends_each_once(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("outbox", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    storage = RunStorage(str(tmp_path / "ray_results"), "job")

    down = TrackingOutbox.open(FailingClient(), run_id, storage)
    down.add_metrics({"val_AP": 0.1, "loss": 2.0, "flag": True}, step=0, epoch=0)
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "p.txt").write_text("x")
    down.add_artifacts(tmp_path / "plots", "epoch000")
    assert not down.flush(delays_s=())
    assert "epochs 0" in down.describe() and "epoch000" in down.describe()
    assert (tmp_path / "ray_results" / "job" / OUTBOX_FILENAME).exists()

    # a later process (the next epoch, the driver, register.py) reads the file; a lost reply is re-sent
    up = TrackingOutbox.open(client, run_id, storage)
    up.add_metrics({"val_AP": math.nan}, step=1, epoch=1)
    assert up.flush(delays_s=()) and up.describe() == "nothing"
    again = TrackingOutbox.open(client, None, storage)
    assert again.pending == []
    replay = TrackingOutbox(client, run_id, storage, pending=[*down.pending])
    assert replay.flush(delays_s=())  # the same batch again (its reply was "lost"): stored once

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_AP"))
    assert history[0] == (0, 0.1) and len(history) == 2 and math.isnan(history[1][1])
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0]
    assert "flag" not in client.get_run(run_id).data.metrics
    assert [a.path for a in client.list_artifacts(run_id)] == ["p.txt"]
    assert not (tmp_path / "ray_results" / "job" / OUTBOX_FILENAME).exists()


def test_durable_through_holds_back_epochs_without_a_registered_checkpoint(tmp_path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("held")).info.run_id
    outbox = TrackingOutbox.open(client, run_id, RunStorage(str(tmp_path / "ray_results"), "job"))
    outbox.add_metrics({"resumed_from_epoch": 0.0}, step=1)
    outbox.add_metrics({"val_AP": 0.2}, step=1, epoch=1)
    assert not outbox.flush(delays_s=(), durable_through=0)
    assert [b.epoch for b in outbox.pending] == [1]
    outbox.drop_epochs_from(1)  # a resumed run trains epoch 1 again
    assert outbox.flush(delays_s=())
    assert client.get_metric_history(run_id, "val_AP") == []
    assert len(client.get_metric_history(run_id, "resumed_from_epoch")) == 1
