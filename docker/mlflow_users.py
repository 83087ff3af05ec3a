"""Create (or update) the MLflow user the pipeline logs in as, on a server running `--app-name basic-auth`.

Run once per `docker compose up` by the one-shot `mlflow-users` service, as the server's admin:

    MLFLOW_TRACKING_URI=http://mlflow:5000
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD    the admin account (this script's own login)
    PIPELINE_USERNAME / PIPELINE_PASSWORD                  the account the Ray nodes use (from .env)

The pipeline user is an ordinary (non-admin) user: with the server's `default_permission = READ` it reads
everything and manages what it creates (its experiments, runs and registered models). Running it again
sets the password from `.env` again, so changing it there and re-running `docker compose up` rotates it.
Exit codes: 0 done, 2 missing settings, 1 the server refused.
"""

from __future__ import annotations

import logging
import os
import sys

from mlflow.exceptions import MlflowException, RestException
from mlflow.server.auth.client import AuthServiceClient

logger = logging.getLogger("mlflow_users")
REQUIRED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "PIPELINE_USERNAME",
            "PIPELINE_PASSWORD")  # fmt: skip


def ensure_user(client: AuthServiceClient, username: str, password: str) -> str:
    """Create ``username`` with ``password``, or set the password of the existing user; returns what was done."""
    try:
        user = client.get_user(username)
    except RestException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        return "created"
    if user.is_admin:
        raise MlflowException(f"{username!r} is an admin account; the pipeline must log in as an ordinary user")
    client.update_user_password(username, password)
    return "updated"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        logger.error("missing settings: %s (see .env.example)", ", ".join(missing))
        return 2
    username = os.environ["PIPELINE_USERNAME"]
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        logger.error("PIPELINE_USERNAME must differ from the admin username %r", username)
        return 2
    try:
        done = ensure_user(
            AuthServiceClient(os.environ["MLFLOW_TRACKING_URI"]), username, os.environ["PIPELINE_PASSWORD"]
        )
    except MlflowException as error:
        logger.error("could not set up MLflow user %r: %s", username, error.message)
        return 1
    logger.info("MLflow user %r %s", username, done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
