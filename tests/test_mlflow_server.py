"""The `mlflow_server` fixture is a real tracking server: runs, metrics, proxied artifacts and the model
registry all go over HTTP, and what the proxy stores lands in the server's artifact destination."""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

import tests.mlflow_server as mlflow_server_module
from pipelines.inference import Predictor
from pipelines.serving import example_image
from tests.mlflow_server import (
    ARTIFACTS_DIRNAME,
    LOOPBACK,
    http_get,
    running_mlflow_server,
    session_server_root,
)
from tests.registry_helpers import register_tiny_model

pytestmark = pytest.mark.server


@pytest.fixture
def tracking_uri(mlflow_server: str) -> Iterator[str]:
    """Point the fluent API (and the registry, which follows it) at the server; restore it afterwards."""
    previous = mlflow.get_tracking_uri() if mlflow.tracking.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(mlflow_server)
    try:
        assert mlflow.get_registry_uri() == mlflow_server, "a registry URI set elsewhere would bypass the server"
        yield mlflow_server
    finally:
        mlflow.set_tracking_uri(previous)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_server_is_up_on_loopback(
    mlflow_server: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    assert mlflow_server.startswith(f"http://{LOOPBACK}:")
    assert http_get(f"{mlflow_server}/health") == (200, "OK")
    assert http_get(f"{mlflow_server}/version") == (200, mlflow.__version__)
    root = session_server_root(tmp_path_factory)
    assert (root / "mlflow.db").is_file()
    if Path("/proc/self/cmdline").exists():  # the check the failure tests below rely on sees a live server
        assert _processes_mentioning(str(root))


def test_run_metric_and_proxied_artifact(
    mlflow_server: str,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment(_unique("server-test"))
    # The server picks the artifact root: its proxy, not a path on this machine.
    assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")

    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    for step, loss in enumerate([1.0, 0.5, 0.25]):
        client.log_metric(run_id, "loss", loss, step=step)
    client.log_param(run_id, "align_loss_weight", "1.0")
    note = tmp_path / "note.txt"
    note.write_text(f"run {run_id}\n")
    client.log_artifact(run_id, str(note), artifact_path="notes")
    client.set_terminated(run_id)

    finished = client.get_run(run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.params == {"align_loss_weight": "1.0"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5), (2, 0.25)]
    assert finished.info.artifact_uri == f"mlflow-artifacts:/{experiment_id}/{run_id}/artifacts"
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/note.txt"]

    # The upload went through the proxy into the server's --artifacts-destination ...
    stored = session_server_root(tmp_path_factory) / ARTIFACTS_DIRNAME / experiment_id / run_id / "artifacts"
    assert (stored / "notes" / "note.txt").read_text() == f"run {run_id}\n"
    # ... and comes back through it.
    downloaded = Path(client.download_artifacts(run_id, "notes/note.txt", dst_path=str(tmp_path / "back")))
    assert downloaded.read_text() == f"run {run_id}\n"


def test_registered_model_loads_by_alias_through_the_server(
    tracking_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The pipeline's registered model (a pyfunc model of safetensors + JSON, no pickle) goes through the
    artifact proxy and loads by alias with pickle deserialization switched off."""
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    name = _unique("server-test-model")
    client = MlflowClient(tracking_uri=tracking_uri)
    version, aliased, loaded = register_tiny_model(tracking_uri, name, 0.5, tmp_path / "v1")
    assert (version, aliased) == ("1", True)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1"
    # The model files were uploaded through the proxy too.
    download_uri = client.get_model_version_download_uri(name, "1")
    assert download_uri.startswith("mlflow-artifacts:/"), download_uri
    stored = session_server_root(tmp_path_factory) / ARTIFACTS_DIRNAME / download_uri.removeprefix("mlflow-artifacts:/")
    assert (stored / "MLmodel").is_file() and (stored / "artifacts" / "model.safetensors").is_file()
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    image = example_image()
    frame = model.predict(pd.DataFrame({"image": [image]}), params={"top_k": 3})
    expected = Predictor(loaded, top_k=3)([image])[0]
    assert frame["score"].tolist() == pytest.approx(expected["scores"].tolist(), abs=1e-6)

    # A second, worse version does not move the alias.
    assert register_tiny_model(tracking_uri, name, 0.1, tmp_path / "v2", seed=1)[:2] == ("2", False)
    assert client.get_model_version_by_alias(name, "champion").version == "1"


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (Linux /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            pass  # the process ended while we looked
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
def test_server_that_never_gets_healthy_is_stopped(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match=r"not healthy after .*server\.log"),
        running_mlflow_server(tmp_path, startup_timeout_s=0.5),
    ):
        pytest.fail("the server cannot be healthy within 0.5 s")
    deadline = time.monotonic() + 5.0
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(tmp_path)) == [], "the server's process group outlived the failed start"


def test_server_that_exits_reports_its_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    crash = [sys.executable, "-c", "import sys; print('backend store unreachable'); sys.exit(3)"]
    monkeypatch.setattr(mlflow_server_module, "server_command", lambda *args, **kwargs: crash)
    with (
        pytest.raises(RuntimeError, match=r"(?s)exited with code 3 .*backend store unreachable"),
        running_mlflow_server(tmp_path),
    ):
        pytest.fail("a crashed server must not be yielded")
