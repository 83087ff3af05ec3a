"""Point MLflow's fluent API at one tracking/registry URI for a block (shared by tracking and model loading)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import mlflow
from mlflow.tracking._model_registry import utils as registry_utils
from mlflow.tracking._tracking_service import utils as tracking_utils


@contextlib.contextmanager
def fluent_uris(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``uri`` for a block, then restore the previous
    state, including the ``MLFLOW_TRACKING_URI``/``MLFLOW_REGISTRY_URI`` variables that ``set_*_uri`` export:
    a library call must not redirect later clients or child processes to another store."""
    saved_env = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)  # no public getter tells "unset"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
