"""A real MLflow tracking server for tests: `mlflow server` in a subprocess on a loopback port.

The server uses a SQLite backend store and serves artifacts through its proxy (`mlflow-artifacts:` URIs),
as the compose stack's server does with PostgreSQL and S3. Layout under the directory it is given:

    mlflow.db     backend store (runs, metrics, model registry)
    artifacts/    --artifacts-destination (what clients upload through the proxy lands here)
    server.log    the server's stdout and stderr

The session fixture `mlflow_server` is registered once for the whole suite in `tests/conftest.py` (one
definition, so one server per session, whichever modules use it):

    def test_something(mlflow_server: str) -> None:
        client = mlflow.MlflowClient(mlflow_server)  # "http://127.0.0.1:<port>"

The server runs in its own process group, so teardown (and a failed start) stops it and every worker it
spawned. Clients should talk to 127.0.0.1 directly, without an HTTP proxy: `running_mlflow_server` adds the
loopback address to `NO_PROXY` for the test process while the server runs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
BACKEND_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "artifacts"
LOG_FILENAME = "server.log"
SESSION_DIRNAME = "mlflow_server"
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
_START_ATTEMPTS = 3  # a free port can be taken between probing it and the server binding it


def mlflow_executable() -> Path:
    """The `mlflow` console script of the interpreter running the tests (same venv, same version)."""
    path = Path(sys.executable).parent / "mlflow"
    if not path.exists():
        raise FileNotFoundError(f"no mlflow executable next to {sys.executable}: expected {path}")
    return path


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def server_command(root: Path, port: int, allowed_hosts: str | None = None, app_name: str | None = None) -> list[str]:
    """The `mlflow server` command line for a server whose files live under `root` (absolute);
    `app_name` is passed as `--app-name` (e.g. "basic-auth")."""
    command = [
        str(mlflow_executable()),
        "server",
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / BACKEND_FILENAME}",
        "--artifacts-destination",
        str(root / ARTIFACTS_DIRNAME),
        "--serve-artifacts",
        "--workers",
        "1",
    ]
    if allowed_hosts is not None:
        command += ["--allowed-hosts", allowed_hosts]
    if app_name is not None:
        command += ["--app-name", app_name]
    return command


def http_get(
    url: str, host_header: str | None = None, timeout_s: float = 10.0, auth: tuple[str, str] | None = None
) -> tuple[int, str]:
    """GET `url` without any HTTP proxy (optional Host header, optional HTTP basic `auth` (user, password));
    returns (status, body).

    Raises OSError when nothing answers.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Host": host_header} if host_header else {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    request = urllib.request.Request(url, headers=headers)
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, wait, then SIGKILL whatever is left of the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_TIMEOUT_S)
    # Workers can outlive the parent (or ignore SIGTERM): the group id stays valid while any member lives.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=STOP_TIMEOUT_S)


def _wait_healthy(process: subprocess.Popen, base_url: str, timeout_s: float) -> str | None:
    """Poll `/health` until it answers OK. Returns None when healthy, else why it is not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return f"exited with code {process.returncode} before it was healthy"
        try:
            status, body = http_get(f"{base_url}/health", timeout_s=2.0)
            if status == 200 and body.strip() == "OK":
                return None
        except OSError:
            pass  # not listening yet
        time.sleep(0.25)
    return f"not healthy after {timeout_s:.0f} s"


@contextlib.contextmanager
def _no_proxy_for_loopback() -> Iterator[None]:
    """Keep `requests` (MLflow's client) from sending loopback traffic through an HTTP proxy."""
    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    for name, value in saved.items():
        entries = [entry for entry in (value or "").split(",") if entry]
        os.environ[name] = ",".join([*entries, LOOPBACK, "localhost"])
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def running_mlflow_server(
    root: Path,
    allowed_hosts: str | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
    app_name: str | None = None,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[str]:
    """Start `mlflow server` on a free 127.0.0.1 port with its files under `root`; yield its base URL.

    Args:
        root: directory for the SQLite store, the artifact destination and the server log (created).
        allowed_hosts: passed as `--allowed-hosts` (None: MLflow's default, localhost + private IPs).
        startup_timeout_s: how long to wait for `/health` before giving up.
        app_name: `--app-name` of the server, e.g. "basic-auth" (None: no authentication).
        extra_env: variables for the server process on top of the test's environment without `MLFLOW_*`
            (e.g. `MLFLOW_AUTH_CONFIG_PATH`, `MLFLOW_AUTH_ADMIN_PASSWORD`, `MLFLOW_FLASK_SERVER_SECRET_KEY`).
        port: listen on this port (e.g. to restart a stopped server where its clients expect it; one
            attempt, no retry on another port); None: a free port.

    Yields:
        "http://127.0.0.1:<port>", the tracking URI (and registry URI) of the server.

    Raises:
        RuntimeError: the server exited or did not become healthy in time; the message holds its log.
    """
    root = Path(root).resolve()
    (root / ARTIFACTS_DIRNAME).mkdir(parents=True, exist_ok=True)
    log_path = root / LOG_FILENAME
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # no inherited URIs or flags
    env["PYTHONUNBUFFERED"] = "1"
    # The GenAI job runner (huey consumers, a store under /dev/shm) is not needed for tracking and the
    # registry, and starting it would only slow the server down on a small test machine.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.update(extra_env or {})
    fixed_port = port
    for attempt in range(1, _START_ATTEMPTS + 1):
        port = fixed_port or free_loopback_port()
        base_url = f"http://{LOOPBACK}:{port}"
        log_start = log_path.stat().st_size if log_path.exists() else 0
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                server_command(root, port, allowed_hosts, app_name),
                cwd=root,  # anything the server resolves relative to its CWD stays under root
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: teardown reaches uvicorn's workers too
            )
        try:
            failure = _wait_healthy(process, base_url, startup_timeout_s)
        except BaseException:  # KeyboardInterrupt while waiting: never leave the server behind
            _stop(process)
            raise
        if failure is None:
            break
        _stop(process)
        log_text = log_path.read_bytes()[log_start:].decode(errors="replace")
        if "address already in use" not in log_text.lower() or attempt == _START_ATTEMPTS or fixed_port:
            raise RuntimeError(f"mlflow server at {base_url} {failure}; log {log_path}:\n{log_text[-6000:]}")
    try:
        with _no_proxy_for_loopback():
            yield base_url
    finally:
        _stop(process)


def session_server_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session fixture's server keeps its files (for tests that inspect the artifact store)."""
    return tmp_path_factory.getbasetemp() / SESSION_DIRNAME


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real MLflow tracking server for the test session; yields its base URL (http://127.0.0.1:<port>).

    Files: `session_server_root(tmp_path_factory)` (see the module docstring). Tests sharing it should use
    experiment and model names of their own (e.g. with a uuid suffix).
    """
    root = tmp_path_factory.mktemp(SESSION_DIRNAME, numbered=False)
    with running_mlflow_server(root) as base_url:
        yield base_url
