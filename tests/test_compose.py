"""The invariants of docker-compose.yml (no Docker engine here: the file is parsed, not run).

Loopback-only ports, secrets only from `.env`, healthchecks and conditional `depends_on`, the GPU reservation,
pinned images that match the project's pins, one shared volume on every Ray node, and an `.env.example` that
covers every variable. MLflow requires a login (basic-auth app, the pipeline user from `.env`), reaches MinIO
with a bucket-only user and does not run as root. The MLflow `--allowed-hosts` value and the basic-auth setup
(docker/basic_auth.ini, docker/mlflow_users.py) are also tried on real servers.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.mlflow_server import http_get, running_mlflow_server

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DOCKER_DIR = REPO / "docker"

LOOPBACK = "127.0.0.1"
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
# `${NAME}`, `${NAME:?message}` or `${NAME?message}`: a value that can only come from the environment/.env.
NO_DEFAULT_REFERENCE = re.compile(r"\$\{[A-Z][A-Z0-9_]*(?:\??|:\?[^}]*)\}")
# Compose interpolation (`$$` is an escaped `$` that the container's shell expands, not compose).
COMPOSE_VARIABLE = re.compile(r"(?<!\$)\$(?:\{([A-Za-z_][A-Za-z0-9_]*)|([A-Za-z_][A-Za-z0-9_]*))")
ENV_LINE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
SHORT_PORT = re.compile(
    r"^(?:(?P<ip>[0-9.]+|\[[0-9a-fA-F:]+\]):)?(?:(?P<host>\$\{[^}]+\}|[0-9-]+):)?(?P<container>[0-9-]+)(?:/(?:tcp|udp))?$"
)
SHARED_MOUNT = "/shared"


def _load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # safe_load resolves the `<<: *anchor` merges


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _env_example() -> dict[str, str]:
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := ENV_LINE.match(line.strip()):
            entries[match.group(1)] = match.group(2)
    return entries


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment` as a dict, whichever of the two compose syntaxes it uses."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command") or []
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _ray_nodes(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if _command(s)[:2] == ["ray", "start"]}


def _is_one_shot(service: dict[str, Any]) -> bool:
    """A job that runs once and exits (marked `restart: "no"`); everything else is long-running."""
    return service.get("restart") == "no"


def _strings(node: Any) -> list[str]:
    """Every string value (and mapping key) anywhere under `node`."""
    if isinstance(node, dict):
        return [s for key, value in node.items() for s in [str(key), *_strings(value)]]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


def _image_tag(image: str) -> str | None:
    """The tag of an image reference (None when it has none); a digest counts as a tag."""
    if "@sha256:" in image:
        return image.split("@", 1)[1]
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def _pyproject_pin(package: str) -> str:
    """The version spec of a dependency in pyproject.toml, e.g. '==2.60.0' for ray."""
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(rf'"{re.escape(package)}(?:\[[^\]]*\])?\s*([<>=!~][^"]*)"', text)
    assert match, f"{package} is not pinned in pyproject.toml"
    return match.group(1)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_published_ports_bind_loopback_only(services: dict[str, dict[str, Any]]) -> None:
    published = {}
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name}: host networking bypasses the port bindings"
        assert not service.get("privileged"), f"{name}: privileged container"
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip, container = port.get("host_ip"), str(port.get("target"))
            else:
                match = SHORT_PORT.match(str(port))
                assert match, f"{name}: unparsable port {port!r}"
                host_ip, container = match.group("ip"), match.group("container")
            assert host_ip == LOOPBACK, f"{name}: port {port!r} is not bound to {LOOPBACK}"
            published[(name, container)] = port
    # The UIs users need are published (so the loop above checked something).
    assert ("ray-head", "8265") in published, "the Ray dashboard/job API must be published on loopback"
    assert ("mlflow", "5000") in published, "the MLflow UI must be published on loopback"
    assert not any(name in {"postgres", "ray-worker-gpu", "ray-worker-cpu"} for name, _ in published)


def test_secrets_only_come_from_env_file(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    secret_values = 0
    for name, service in services.items():
        for key, value in _environment(service).items():
            if SECRET_NAME.search(key):
                secret_values += 1
                assert NO_DEFAULT_REFERENCE.fullmatch(value), (
                    f"{name}.{key} = {value!r}: a secret must be a ${{VAR:?...}} reference without a default"
                )
    assert secret_values >= 5, "expected the PostgreSQL, MinIO, S3 and Ray token secrets"
    # Credentials inside URLs (e.g. the PostgreSQL store URI) are references too.
    for text in _strings(compose):
        for password in re.findall(r"://[^/\s:@]+:([^@\s]+)@", text):
            assert NO_DEFAULT_REFERENCE.fullmatch(password), f"literal password in URL {text!r}"
    # ... and the committed template holds no secret values.
    for key, value in _env_example().items():
        if SECRET_NAME.search(key):
            assert value == "", f".env.example sets {key}: leave secrets empty in the template"


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    long_running = [name for name, service in services.items() if not _is_one_shot(service)]
    assert {"postgres", "minio", "mlflow", "ray-head", "ray-worker-gpu", "ray-worker-cpu"} <= set(long_running)
    for name in long_running:
        healthcheck = services[name].get("healthcheck")
        assert healthcheck, f"{name} has no healthcheck"
        assert not healthcheck.get("disable"), f"{name}: healthcheck disabled"
        test = healthcheck["test"]
        assert isinstance(test, list) and test[0] in {"CMD", "CMD-SHELL"}, f"{name}: healthcheck test {test!r}"
        assert int(healthcheck.get("retries", 0)) > 0, f"{name}: healthcheck without retries"


def test_depends_on_waits_on_health_or_completion(services: dict[str, dict[str, Any]]) -> None:
    edges = 0
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        assert isinstance(depends_on, dict), f"{name}: depends_on must be a mapping with conditions"
        for target, spec in depends_on.items():
            edges += 1
            assert target in services, f"{name} depends on unknown {target}"
            condition = (spec or {}).get("condition")
            if _is_one_shot(services[target]):
                assert condition == "service_completed_successfully", f"{name} -> {target}: {condition}"
            else:
                assert condition == "service_healthy", f"{name} -> {target}: {condition}"
                assert "healthcheck" in services[target], f"{name} waits on {target}, which has no healthcheck"
    assert edges >= 6
    # A one-shot job must be waited on by a long-running service: `up --wait` then accepts its exit 0.
    for name in (n for n, s in services.items() if _is_one_shot(s)):
        waiters = [n for n, s in services.items() if name in s.get("depends_on", {}) and not _is_one_shot(s)]
        assert waiters, f"one-shot {name} is not waited on by any long-running service"
    assert services["mlflow"]["depends_on"].keys() >= {"postgres", "minio-init"}
    for worker in ("ray-worker-gpu", "ray-worker-cpu"):
        assert "ray-head" in services[worker]["depends_on"]


def test_gpu_worker_reserves_nvidia_gpus_and_cpu_profile_exists(services: dict[str, dict[str, Any]]) -> None:
    gpu_worker = services["ray-worker-gpu"]
    devices = gpu_worker["deploy"]["resources"]["reservations"]["devices"]
    assert len(devices) == 1
    device = devices[0]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert device.get("count") == "all" or int(device.get("count", 0)) > 0 or device.get("device_ids")
    assert gpu_worker["profiles"] == ["gpu"]
    cpu_worker = services["ray-worker-cpu"]
    assert cpu_worker["profiles"] == ["cpu"]
    assert "deploy" not in cpu_worker or "devices" not in str(cpu_worker["deploy"])
    # Only the workers are optional: everything else starts with a plain `docker compose up -d`.
    assert {name for name, s in services.items() if "profiles" in s} == {"ray-worker-gpu", "ray-worker-cpu"}
    assert _env_example()["COMPOSE_PROFILES"] in {"gpu", "cpu"}


def test_images_are_pinned_and_match_the_project_pins(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image")
        assert image or "build" in service, f"{name} has neither image nor build"
        if image:
            tag = _image_tag(image)
            assert tag, f"{name}: image {image!r} has no tag"
            assert tag != "latest" and "$" not in tag, f"{name}: image {image!r} is not pinned"
    assert services["minio"]["image"].startswith("quay.io/minio/minio:RELEASE.")
    assert services["minio-init"]["image"].startswith("quay.io/minio/mc:RELEASE.")
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    for name in _ray_nodes(services):
        assert services[name]["image"] == f"sd-detr:{version}", f"{name}: the project image tag is the version"

    # Base images of the Dockerfiles: pinned, and the same Ray/MLflow versions as pyproject.toml.
    ray_version = _pyproject_pin("ray").removeprefix("==")
    mlflow_spec = _pyproject_pin("mlflow")
    project_dockerfile = (DOCKER_DIR / "project.Dockerfile").read_text()
    default_base = re.search(r"^ARG RAY_BASE_IMAGE=(\S+)$", project_dockerfile, re.MULTILINE).group(1)
    assert default_base == f"rayproject/ray:{ray_version}-py311-gpu"
    assert _env_example()["RAY_BASE_IMAGE"] == default_base
    assert f"RAY_BASE_IMAGE:-{default_base}}}" in COMPOSE_FILE.read_text()
    assert "torch==2.14.1 torchvision==0.29.1" in project_dockerfile  # the README's install
    assert re.search(r"^RUN pip install \.", project_dockerfile, re.MULTILINE)
    mlflow_from = re.search(r"^FROM (\S+)$", (DOCKER_DIR / "mlflow.Dockerfile").read_text(), re.MULTILINE).group(1)
    mlflow_image_version = mlflow_from.rsplit(":v", 1)[1]
    lower, upper = re.fullmatch(r">=([\d.]+),<([\d.]+)", mlflow_spec).groups()
    assert _version(lower) <= _version(mlflow_image_version) < _version(upper), (mlflow_from, mlflow_spec)
    assert services["mlflow"]["image"].endswith(f":{mlflow_image_version}")


def test_ray_nodes_share_storage_and_shm(services: dict[str, dict[str, Any]]) -> None:
    nodes = _ray_nodes(services)
    assert set(nodes) == {"ray-head", "ray-worker-gpu", "ray-worker-cpu"}
    assert "--head" in _command(nodes["ray-head"])
    sources = set()
    for name, node in nodes.items():
        mounts = [str(v).split(":") for v in node.get("volumes", [])]
        shared = [m for m in mounts if len(m) >= 2 and m[-1] == SHARED_MOUNT]
        assert len(shared) == 1, f"{name} does not mount the shared storage at {SHARED_MOUNT}"
        sources.add(":".join(shared[0][:-1]))
        assert node.get("shm_size"), f"{name}: shm_size not set (Ray's object store lives in /dev/shm)"
        if name != "ray-head":
            assert "--address=ray-head:6379" in _command(node)
        environment = _environment(node)
        assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert environment["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")
    assert len(sources) == 1, f"Ray nodes mount different shared storage: {sources}"


def test_env_file_is_ignored_and_example_lists_every_variable() -> None:
    assert ".env" in (REPO / ".gitignore").read_text().splitlines()
    ignored = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=REPO, check=False)
    assert ignored.returncode == 0, ".env is not git-ignored"
    template = subprocess.run(["git", "check-ignore", "-q", ".env.example"], cwd=REPO, check=False)
    assert template.returncode == 1, ".env.example must not be ignored"
    referenced = {a or b for a, b in COMPOSE_VARIABLE.findall(COMPOSE_FILE.read_text())}
    listed = set(_env_example())
    assert referenced, "no variables found in the compose file"
    assert referenced <= listed, f"missing from .env.example: {sorted(referenced - listed)}"
    assert listed - referenced <= {"COMPOSE_PROFILES"}, f"unused in compose: {sorted(listed - referenced)}"


def test_mlflow_serves_artifacts_from_s3_and_postgres(services: dict[str, dict[str, Any]]) -> None:
    command = _command(services["mlflow"])
    assert "--serve-artifacts" in command
    assert command[command.index("--artifacts-destination") + 1].startswith("s3://")
    assert _environment(services["mlflow"])["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert _environment(services["mlflow"])["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    allowed = command[command.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow", "mlflow:5000"} <= set(allowed)


@pytest.mark.server
def test_mlflow_allowed_hosts_admit_the_service_name_on_a_real_server(
    services: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """The compose `--allowed-hosts` value on a real `mlflow server`: the Ray nodes' Host header
    (`mlflow:5000`) and the host's browser (`127.0.0.1:<port>`) pass; any other name gets 403."""
    command = _command(services["mlflow"])
    allowed_hosts = command[command.index("--allowed-hosts") + 1]
    with running_mlflow_server(tmp_path, allowed_hosts=allowed_hosts) as url:
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000", "127.0.0.1:15000"):
            status, body = http_get(api, host_header=host)
            assert status == 200, f"Host {host}: {status} {body[:200]}"
        for host in ("evil.example.com", "mlflow.evil.example.com:5000", "10.0.0.5:5000"):
            status, _ = http_get(api, host_header=host)
            assert status == 403, f"Host {host} was not rejected ({status})"
        # The healthcheck route answers whatever the Host header is.
        assert http_get(f"{url}/health", host_header="evil.example.com") == (200, "OK")


# --- authentication, scoped object-store credentials, non-root ----------------------------------------------

AUTH_INI = DOCKER_DIR / "basic_auth.ini"
USERS_SCRIPT = DOCKER_DIR / "mlflow_users.py"
ROOT_USERS = {"0", "root"}


def _reference_name(value: str) -> str:
    """`FOO` of a `${FOO...}` compose reference."""
    match = re.fullmatch(r"\$\{([A-Z][A-Z0-9_]*)[^}]*\}", value)
    assert match, f"{value!r} is not a ${{VAR}} reference"
    return match.group(1)


def _auth_config() -> configparser.SectionProxy:
    parser = configparser.ConfigParser()
    parser.read(AUTH_INI)
    return parser["mlflow"]


def _dockerfile_user(text: str) -> str:
    users = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert users, "the Dockerfile sets no USER"
    return users[-1].split(":")[0]


def test_mlflow_runs_the_basic_auth_app_as_a_non_root_user(services: dict[str, dict[str, Any]]) -> None:
    mlflow = services["mlflow"]
    command = _command(mlflow)
    assert command[command.index("--app-name") + 1] == "basic-auth"
    environment = _environment(mlflow)
    for key in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert NO_DEFAULT_REFERENCE.fullmatch(environment[key]), f"mlflow.{key} must come from .env"
    # The app's settings: from the image, no secret in them, anonymous users get nothing, a persistent store.
    dockerfile = (DOCKER_DIR / "mlflow.Dockerfile").read_text()
    assert re.search(r"^COPY basic_auth\.ini (\S+)$", dockerfile, re.MULTILINE).group(1) == "/etc/mlflow/basic_auth.ini"
    assert "MLFLOW_AUTH_CONFIG_PATH=/etc/mlflow/basic_auth.ini" in dockerfile
    assert re.search(r"(?i)flask-wtf==", dockerfile), "the basic-auth app imports flask_wtf"
    auth = _auth_config()
    assert "admin_password" not in auth, "the admin password must come from .env, not the image"
    assert auth["default_permission"] in {"READ", "NO_PERMISSIONS"}
    store = auth["database_uri"]
    assert store.startswith("sqlite:////") or store.startswith("postgresql")
    if store.startswith("sqlite:////"):
        folder = str(Path(store.removeprefix("sqlite:///")).parent)
        mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in mlflow.get("volumes", [])}
        assert mounts.get(folder) == "mlflow-auth", f"the user store {store} is not on a volume"
        assert f"mkdir -p {folder}" in dockerfile and f"chown 10001:10001 {folder}" in dockerfile
    # Not root: the image's USER and the services that run it.
    assert _dockerfile_user(dockerfile) not in ROOT_USERS
    for name in ("mlflow", "mlflow-users"):
        user = str(services[name].get("user", "")).split(":")[0]
        assert user and user not in ROOT_USERS, f"{name} must run as a non-root user, got {user!r}"
        assert services[name]["image"] == mlflow["image"]


def test_clients_authenticate_as_the_pipeline_user_from_env(services: dict[str, dict[str, Any]]) -> None:
    users_job = services["mlflow-users"]
    assert _is_one_shot(users_job)
    assert users_job["depends_on"]["mlflow"]["condition"] == "service_healthy"
    job_env = _environment(users_job)
    assert _reference_name(job_env["MLFLOW_TRACKING_PASSWORD"]) == "MLFLOW_AUTH_ADMIN_PASSWORD"
    assert _reference_name(job_env["PIPELINE_PASSWORD"]) == "MLFLOW_TRACKING_PASSWORD"
    assert _reference_name(job_env["PIPELINE_USERNAME"]) == "MLFLOW_TRACKING_USERNAME"
    assert _command(users_job)[-1] == "/usr/local/lib/mlflow_users.py"
    assert "COPY mlflow_users.py /usr/local/lib/mlflow_users.py" in (DOCKER_DIR / "mlflow.Dockerfile").read_text()
    for name, node in _ray_nodes(services).items():
        environment = _environment(node)
        assert _reference_name(environment["MLFLOW_TRACKING_USERNAME"]) == "MLFLOW_TRACKING_USERNAME", name
        assert NO_DEFAULT_REFERENCE.fullmatch(environment["MLFLOW_TRACKING_PASSWORD"]), name
        assert _reference_name(environment["MLFLOW_TRACKING_PASSWORD"]) == "MLFLOW_TRACKING_PASSWORD", name
    assert services["ray-head"]["depends_on"]["mlflow-users"]["condition"] == "service_completed_successfully"
    example = _env_example()
    assert example["MLFLOW_TRACKING_USERNAME"] != example["MLFLOW_AUTH_ADMIN_USERNAME"]


def test_mlflow_reaches_minio_with_a_bucket_only_user(services: dict[str, dict[str, Any]]) -> None:
    environment = _environment(services["mlflow"])
    access, secret = environment["AWS_ACCESS_KEY_ID"], environment["AWS_SECRET_ACCESS_KEY"]
    assert "MINIO_ROOT" not in access + secret, "MLflow must not hold the MinIO root credentials"
    assert _reference_name(access) == "MLFLOW_S3_ACCESS_KEY" and _reference_name(secret) == "MLFLOW_S3_SECRET_KEY"
    assert not any("MINIO_ROOT" in value for value in environment.values())
    init = services["minio-init"]
    init_env = _environment(init)
    assert _reference_name(init_env["MLFLOW_S3_ACCESS_KEY"]) == "MLFLOW_S3_ACCESS_KEY"
    assert _reference_name(init_env["MLFLOW_S3_SECRET_KEY"]) == "MLFLOW_S3_SECRET_KEY"
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in init.get("volumes", [])}
    assert mounts["/etc/minio-init/minio-init.sh"] == "./docker/minio-init.sh"
    assert mounts["/etc/minio-init/minio-mlflow-policy.json"] == "./docker/minio-mlflow-policy.json"
    assert init["entrypoint"][-1] == "/etc/minio-init/minio-init.sh"
    script = (DOCKER_DIR / "minio-init.sh").read_text()
    for step in (
        "mc mb --ignore-existing",
        "mc admin policy create s3 mlflow-bucket",
        'mc admin user add s3 "$MLFLOW_S3_ACCESS_KEY"',
        "mc admin policy attach s3 mlflow-bucket --user",
    ):
        assert step in script, step  # fmt: skip
    # Every statement of the policy allows S3 object/bucket actions on the one bucket, nothing else.
    policy = json.loads((DOCKER_DIR / "minio-mlflow-policy.json").read_text().replace("BUCKET", "mlflow"))
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        assert set(statement["Resource"]) <= {"arn:aws:s3:::mlflow", "arn:aws:s3:::mlflow/*"}, statement
        assert all(action.startswith("s3:") and "*" not in action for action in statement["Action"]), statement
    actions = {action for statement in policy["Statement"] for action in statement["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket"} <= actions


def _auth_server_env(tmp_path: Path, admin_password: str) -> dict[str, str]:
    """The compose server's auth settings with the user store moved under ``tmp_path``."""
    parser = configparser.ConfigParser()
    parser.read(AUTH_INI)
    parser["mlflow"]["database_uri"] = f"sqlite:///{tmp_path / 'basic_auth.db'}"
    ini = tmp_path / "basic_auth.ini"
    with ini.open("w") as handle:
        parser.write(handle)
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
    }


def _run_users_script(url: str, admin: tuple[str, str], pipeline: tuple[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=admin[0], MLFLOW_TRACKING_PASSWORD=admin[1],
               PIPELINE_USERNAME=pipeline[0], PIPELINE_PASSWORD=pipeline[1])  # fmt: skip
    return subprocess.run(
        [sys.executable, str(USERS_SCRIPT)], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.server
def test_basic_auth_on_a_real_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlflow server --app-name basic-auth` with docker/basic_auth.ini: anonymous and wrong logins get 401,
    the admin gets in, docker/mlflow_users.py creates the pipeline user (twice: idempotent), and the pipeline
    logs in with it (.env's MLFLOW_TRACKING_USERNAME/PASSWORD) to track runs and register a model."""
    from mlflow.exceptions import MlflowException
    from mlflow.server.auth.client import AuthServiceClient
    from mlflow.tracking import MlflowClient

    from tests.registry_helpers import register_tiny_model

    admin, pipeline = ("admin", "admin-Pa55word-1"), ("sd-detr", "pipeline-Pa55word-2")
    env = _auth_server_env(tmp_path, admin[1])
    with running_mlflow_server(tmp_path / "server", app_name="basic-auth", extra_env=env) as url:
        api = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
        assert http_get(api)[0] == 401
        assert http_get(api, auth=(admin[0], "wrong-password"))[0] == 401
        assert http_get(api, auth=admin)[0] == 200
        assert http_get(f"{url}/health") == (200, "OK")  # the compose healthcheck needs no login

        assert http_get(api, auth=pipeline)[0] == 401  # not created yet
        first = _run_users_script(url, admin, pipeline)
        assert first.returncode == 0 and "created" in first.stderr, first.stderr
        again = _run_users_script(url, admin, pipeline)
        assert again.returncode == 0 and "updated" in again.stderr, again.stderr
        refused = _run_users_script(url, (admin[0], "wrong-password"), pipeline)
        assert refused.returncode == 1 and "could not set up" in refused.stderr, refused.stderr
        assert http_get(api, auth=pipeline)[0] == 200

        # The pipeline's clients authenticate from the environment, as the Ray nodes do from .env.
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", pipeline[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", pipeline[1])
        version, aliased, _ = register_tiny_model(url, "auth-model", 0.5, tmp_path / "model")
        assert (version, aliased) == ("1", True)
        assert MlflowClient(url).get_model_version_by_alias("auth-model", "champion").version == "1"
        with pytest.raises(MlflowException, match=r"(?i)permission|403"):
            AuthServiceClient(url).create_user("intruder", "intruder-Pa55word-3")  # not an admin
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong-password")
        with pytest.raises(MlflowException, match="401"):
            MlflowClient(url).search_experiments(max_results=1)
