"""`ray start --head` + `ray job submit --working-dir . -- python pipelines/train.py ...` works."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.pipeline_helpers import REPO, tiny_job_overrides

pytestmark = [pytest.mark.ray, pytest.mark.slow]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A separate Ray head started with `ray start --head --block`; yields (job API address, env).

    Every port that `ray start` would otherwise take from a fixed default (GCS 6379, dashboard 8265, dashboard
    agent 52365, client server 10001, workers 10002-19999) is a free one, or, for workers, one the OS picks at
    bind time; the other components bind random ports by default. The head can therefore run beside the
    session's local Ray (`ray_local`), whichever started first.
    """
    gcs, dashboard, agent, client = _free_ports(4)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "ray_head.log").open("w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={gcs}", "--num-cpus=3", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--min-worker-port=0", "--max-worker-port=0",
         "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True).returncode:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up:\n{(tmp_path / 'ray_head.log').read_text()[-3000:]}")
            time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        # `ray start` registered this head as the machine's current cluster; a killed head leaves that file
        # behind, and address auto-detection elsewhere (Train's placement-group cleaner) would chase it
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.exists() and current.read_text().strip().endswith(f":{gcs}"):
            current.unlink()


def test_ray_job_submit_runs_the_training_pipeline(ray_head, synthetic_root, tmp_path) -> None:
    address, env = ray_head
    overrides = tiny_job_overrides(tmp_path, synthetic_root, "submitted", epochs=1)
    overrides += ["scaling.num_workers=1", "tracking.register_model=false"]
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               sys.executable, "pipelines/train.py", *[a for o in overrides for a in ("--set", o)]]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "succeeded" in output and "== sd-detr training finished" in output
    assert "[epoch 0] loss" in output  # rank 0's one-line epoch summary reaches the job's log
    assert "Reporting training result" not in output  # Ray's multi-line metric dump per report does not
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("sd-detr").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "val_AP" in runs[0].data.metrics
